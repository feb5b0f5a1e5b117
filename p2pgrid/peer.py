"""The peer actor: one nursery owning the HTTP/2 server, gossip, mDNS and housekeeping.

>>> import trio, tempfile
>>> async def main():
...     cfg = PeerConfig(name="solo", data_dir=tempfile.mkdtemp(), mdns=False)
...     async with open_peer(cfg) as peer:
...         return peer.name, peer.address.startswith("127.0.0.1:")
>>> trio.run(main)
('solo', True)
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterable

import torch
import trio

from . import buffers, calls, membership, push, tls, wire
from .auth import H_CERT, Caller, Verifier, b64
from .client import Target, Transport, learn_target, maybe_thread
from .config import WILDCARDS, PeerConfig, advertised_addresses
from .addrbook import BookLimits
from .directory import MAX_OBJECTS, Directory, ObjectSummary, PeerRecord
from .errors import NotFound, P2PError, PeerUnavailable, PermissionDenied, Unauthenticated
from .gossip import gossip_loop
from .identity import Identity
from .calls import Calls, Nop
from .clock import check_clock
from .push import BackLinks, Pushers
from .router import Router
from .server import App, serve
from .store import ObjectMeta, Quota, Rules, Store

log = logging.getLogger("p2pgrid.peer")

MAX_SUMMARIES = MAX_OBJECTS  # objects advertised in our directory record


class Peer:
    """State of one running peer. Create with :func:`open_peer`, not directly."""

    def __init__(self, config: PeerConfig, routers: Iterable[Router] = ()):
        from . import plugins
        from .calls import router as calls_router
        from .handlers import router as core_router
        from .owner import router as owner_router

        self.config = config
        self.name = config.name
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity = Identity.load_or_create(data / "identity.key")
        self.cert = tls.load_or_create_certificate(self.identity, data / "tls-cert.der")
        self.store = Store(data / "store")
        self.membership: membership.Membership | None = None
        self.own_cert = b""  # our membership certificate, CBOR (with a network key)
        self._revocations_file: tuple[str, float] | None = None  # (path, mtime) last read
        if config.network_key:
            self.membership, self.own_cert = membership.open_membership(
                config, self.identity, now=time.time())
        elif config.cert:
            raise membership.MembershipError("a membership certificate needs the network's key "
                                             "too (--network-key PUB)")
        self.directory = Directory(self.identity, ttl=config.ttl, max_ttl=config.max_record_ttl,
                                   limits=directory_limits(config), admit=self._admit)
        self.directory.add_listener(self._directory_changed)
        self._bindings_path = data / "names.cbor"
        if self._bindings_path.exists():
            try:
                self.directory.load_bindings(wire.loads(self._bindings_path.read_bytes()))
            except Exception:  # a damaged cache of bindings only costs re-learning them
                log.warning("could not read %s; starting with no name bindings", self._bindings_path)
        self._saved_bindings = self.directory.bindings()
        self.transport = Transport(self.identity, self.name, insecure=config.insecure,
                                   timeout=config.request_timeout)
        if self.own_cert:
            self.transport.headers[H_CERT] = b64(self.own_cert)
        self.clock_offset: float | None = None  # median of the peers' clocks minus ours, once measured
        self.verifier = Verifier(self.identity.key_id)
        self.pushers = Pushers(
            lambda target, frames, link: self.transport.stream(
                target, push.PATH, frames, digest=push.STREAM_DIGEST,
                headers={push.LINK_HEADER: link}),
            _encode_push, retire=lambda target: self.transport.retire(target, "push"),
            open_back=lambda target, link, on_data, started: self.transport.receive_stream(
                target, push.PULL_PATH, on_data, started, digest=push.PULL_DIGEST,
                headers={push.LINK_HEADER: link}),
            deliver=self._deliver, max_frame=max(config.max_body, push.MIN_FRAME),
            busy=lambda key_id: self.calls.waits_on(key_id), keepalive=Nop())
        # ways back that peers opened to us; a frame they do not take ends its link
        self.links = BackLinks(_encode_push, write_timeout=config.write_timeout)
        self.calls = Calls(self)
        self.router = Router()
        self.router.include(core_router)
        self.router.include(calls_router)
        self.router.include(owner_router)
        for r in [*plugins.routers(), *routers]:
            self.router.include(r)
        self.addresses: list[str] = []   # where others dial us, best first; none: not listening
        self.started_at = time.time()
        self.nursery: trio.Nursery | None = None
        self._seeds: dict[str, str | None] = {}       # address -> expected key id
        self._learned: dict[str, Target] = {}         # first-contact targets by address
        self._seeds_warned: set[str] = set()
        self._summaries: dict[str, ObjectSummary] = {}
        self.services: dict = {}            # announced in our directory record (served models...)
        self.extensions: dict[str, object] = {}  # per-plugin state, keyed by plugin name
        self.audit_sinks: list = []  # callables(entry: dict); governance keeps the log
        self.page = None  # set by the web module

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, {self.address}, key={self.identity.key_id})"

    @property
    def address(self) -> str | None:
        """The first address others may dial us at; None for a peer that does not listen."""
        return self.addresses[0] if self.addresses else None

    @property
    def key_id(self) -> str:
        return self.identity.key_id

    # ------------------------------------------------------------ identity of callers

    def authorize(self, caller: Caller) -> None:
        """A caller's name must be the one its key is bound to (first use binds it),
        unless governance pins it: a user registered here must use the registered key.
        With a network key, the name must be certified for the key instead (see
        :mod:`p2pgrid.membership`); registered users with their key still pass."""
        from .governance import authorize as governed
        if caller.name == self.name:
            # our own name is our own key's, whatever first use would bind: the owner's
            # commands sign with it, and it makes a caller privileged on our objects
            if bytes(caller.public_key) != self.identity.public_bytes:
                raise Unauthenticated(f"the name {caller.name!r} is this peer's own")
            return
        if governed(self, caller):
            return
        if self.membership is not None:
            self._authorize_member(caller)
            return
        known = self.directory.name_key(caller.name)
        if known is None:
            self.directory.bind_name(caller.name, caller.public_key, time.monotonic())
        elif known != caller.public_key:
            raise Unauthenticated(f"the name {caller.name!r} is bound to another key")

    def registered(self, caller: Caller) -> bool:
        """Whether `caller` does not share the allowance of unregistered callers: this peer,
        a user registered here, or one the owner or the network vouches for (see
        ``governance.pooled``)."""
        from .governance import pooled
        return not pooled(self, caller)

    def _authorize_member(self, caller: Caller) -> None:
        if caller.public_key == self.identity.public_bytes and caller.name == self.name:
            return
        cert = caller.cert or self.membership.known(caller.public_key)
        if not cert:
            try:   # its directory record may carry one (older clients send no header)
                rec = self.directory.lookup(caller.key_id)
                cert = rec.membership if rec.name == caller.name else b""
            except NotFound:
                pass
        why = self.membership.why_not(caller.name, caller.public_key, cert or None,
                                      now=time.time())
        if why is None:
            self.directory.bind_name(caller.name, caller.public_key, time.monotonic())
            return
        msg = (f"{self.name} serves members of network {self.membership.network} only; "
               f"{caller.name!r} (key {caller.key_id}) is refused: {why}")
        if not cert or self.membership.certificate(cert) is None:
            raise Unauthenticated(msg + "; the network's operator issues certificates "
                                        "(p2pgrid network invite)")
        raise PermissionDenied(msg)

    def _admit(self, rec: PeerRecord) -> str | None:
        """Whether the directory may keep `rec` (see Directory's ``admit``): with a network
        key, only under a valid certificate for its name; a name this peer's governance
        registered with a key, only for that key."""
        if self.membership is not None:
            why = self.membership.why_not(rec.name, rec.public_key, rec.membership or None,
                                          now=time.time())
            if why is not None:
                return why
        from .governance import policy
        user = policy.of(self).store.user(rec.name)
        if user is not None and user.public_key is not None and user.public_key != rec.public_key:
            return f"the name {rec.name!r} is registered on {self.name} with another key"
        return None

    def _directory_changed(self, kind: str, records: list[PeerRecord]) -> None:
        if kind != "accepted" or self.membership is None:
            return
        if any(r.revocations and self.membership.offer(r.revocations) for r in records):
            self._revocations_changed()

    def _revocations_changed(self) -> None:
        """A newer revocation list: keep it, drop who it revokes, and spread it."""
        crl = self.membership.revocations
        log.info("revocation list %d of network %s adopted", crl.serial, self.membership.network)
        try:
            membership.write_revocations(self.config.data_dir / "revocations.cbor", crl)
        except OSError as e:
            log.warning("could not save the revocation list: %s", e)
        if self.membership.why_not(self.name, self.identity.public_bytes, self.own_cert,
                                   now=time.time()) is not None:
            log.error("this peer's own membership (%s) is revoked: other members will refuse it",
                      self.name)
        self.recheck_members()
        if self.directory.own is not None:
            self.reissue()

    def recheck_members(self) -> list[PeerRecord]:
        """Drop the directory records this peer would no longer admit: membership revoked
        or expired, or a name its owner has since registered with another key."""
        gone = [r.key_id for r in self.directory.peers(include_self=False)
                if self._admit(r) is not None]
        dropped = self.directory.drop(gone, time.monotonic())
        if dropped:
            log.warning("dropped %s: membership revoked or expired, or name registered here "
                        "with another key",
                        ", ".join(f"{r.name} ({r.key_id})" for r in dropped))
        return dropped

    def _reload_revocations(self) -> None:
        """Re-read the revocation list file given in the config when it changes (the
        operator's `p2pgrid network revoke` rewrites it)."""
        path = self.config.revocations
        if self.membership is None or not path:
            return
        try:
            if not Path(path).exists():
                return
            stamp = (str(path), Path(path).stat().st_mtime)
            if stamp == self._revocations_file:
                return
            self._revocations_file = stamp
            if self.membership.offer(membership.read_revocations(path)):
                self._revocations_changed()
        except (OSError, ValueError) as e:
            log.warning("could not read the revocation list %s: %s", path, e)

    def audit(self, action: str, caller: str | None = None, **fields) -> None:
        """Record an event (search, compute, get, request, model call...) for the audit trail.
        Fields must be public facts (ids, shapes, names), never values."""
        entry = {"time": time.time(), "peer": self.name, "action": action, "caller": caller, **fields}
        for sink in self.audit_sinks:
            sink(entry)

    # ------------------------------------------------------------ objects

    async def put(self, tensor: torch.Tensor, meta: ObjectMeta, quota: Quota | None = None
                  ) -> ObjectMeta:
        meta = await trio.to_thread.run_sync(self.store.put, tensor, meta, quota)
        self._advertise(meta)
        return meta

    def quota(self) -> Quota:
        """The limits on objects others store here (from the config)."""
        c = self.config
        return Quota(c.store_quota_count, c.store_quota_bytes, c.store_total_count,
                     c.store_total_bytes, host=self.name)

    async def load(self, id: str, *, mapped: bool = False) -> torch.Tensor:
        """Object `id`'s values (`mapped`: see :meth:`p2pgrid.store.Store.load`)."""
        return await trio.to_thread.run_sync(lambda: self.store.load(id, mapped=mapped))

    async def meta(self, id: str) -> ObjectMeta:
        return await trio.to_thread.run_sync(self.store.meta, id)

    async def delete(self, id: str) -> bool:
        gone = await trio.to_thread.run_sync(self.store.delete, id)
        if self._summaries.pop(id, None) is not None:
            self.reissue()
        return gone

    def _advertise(self, meta: ObjectMeta) -> None:
        if not self.advertises(meta):
            return
        if len(self._summaries) >= MAX_SUMMARIES:
            log.warning("%s: %s not advertised: the record lists at most %d objects",
                        self.name, meta.id, MAX_SUMMARIES)
            return
        self._summaries[meta.id] = summary_of(meta)
        self.reissue()

    def advertises(self, meta: ObjectMeta) -> bool:
        """Whether our signed record lists `meta`: objects this peer published, with
        tags. Objects callers stored here (``PutObject``, owned by them) and results
        computed for them are theirs, not ours, and are never advertised as ours."""
        return bool(meta.tags) and meta.owner == self.name and meta.expires is None

    async def publish(self, tensor: torch.Tensor, *, tags: Iterable[str], description: str = "",
                      compute: Iterable[str] = (), get: Iterable[str] = (),
                      aggregate: Iterable[str] = (), min_rows: int | None = None,
                      id: str | None = None, bounds=None, epsilon: float | None = None,
                      columns: Iterable[str] = ()) -> ObjectMeta:
        """Store a tensor owned by this peer and announce it in the directory.

        `aggregate` is an explicit grant of exact aggregates (no longer implied by
        `compute`); names with `compute` only get DP releases, which need `bounds`
        (per-column ``[lo, hi]`` pairs, declared with the data; `epsilon`: the dataset's
        total budget). A WARNING says so when such names exist and no bounds are given.
        `columns`: a table's column names, one per column of a 2-d `tensor`."""
        from .governance import Bounds, of as governance_of
        from .release import warn_unbounded

        compute = tuple(compute)
        rules = Rules(compute=compute, get=tuple(get), aggregate=tuple(aggregate or ()),
                      min_rows=self.config.min_rows if min_rows is None else min_rows)
        declared = Bounds.parse(bounds) if bounds is not None else None
        if declared is not None:
            declared.check(tuple(tensor.shape))
        meta = ObjectMeta(id=id or "", owner=self.name, shape=tuple(tensor.shape),
                          dtype=str(tensor.dtype).removeprefix("torch."), tags=tuple(tags),
                          description=description, rules=rules, columns=tuple(columns))
        meta = await self.put(tensor, meta)
        gov = governance_of(self)
        if declared is not None:
            await trio.to_thread.run_sync(lambda: gov.store.set_dataset(
                meta.id, declared, epsilon, by=self.name))
        warn_unbounded(self, meta, gov.store.dataset(meta.id) is not None)
        return meta

    async def set_rules(self, id: str, change, *, by: str, why: str = "") -> ObjectMeta:
        """Apply `change` (old Rules -> new Rules) to object `id` now (the next request
        sees it) and audit it. Only the owner's paths call this."""
        meta = await self.meta(id)
        old, new = meta.rules, change(meta.rules)
        if new == old:
            return meta
        meta = await trio.to_thread.run_sync(self.store.set_rules, id, new)
        self.audit("rules", by, object=id, old=old.to_dict(), new=new.to_dict(),
                   **({"why": why} if why else {}))
        log.info("%s: rules of %s changed by %s: %s", self.name, id, by, _rules_text(new))
        return meta

    # ------------------------------------------------------------ directory

    def heartbeat(self) -> PeerRecord:
        """Our record for a gossip round: re-signed only when a third of its ttl has
        passed, so unchanged records are not re-spread around the network every round
        (the ttl grows with the network: :meth:`Directory.record_ttl`)."""
        own = self.directory.own
        ttl = self.directory.record_ttl() if own is None else min(own.ttl,
                                                                  self.directory.record_ttl())
        if own is None or time.time() - own.issued_at >= ttl / 3:
            return self.reissue()
        return own

    def reissue(self) -> PeerRecord:
        """Sign and store a new version of our record (after any change to what it says)."""
        return self.directory.issue(
            time.time(), name=self.name, addresses=list(self.addresses),
            cert=self.cert, roles=list(self.config.roles),
            objects=list(self._summaries.values()), services=self.services,
            membership=self.own_cert,
            revocations=self.membership.revocations_bytes() if self.membership else b"")

    def record(self, name_or_key: str) -> PeerRecord:
        return self.directory.lookup(name_or_key)

    def target(self, rec: PeerRecord) -> Target:
        if not rec.addresses:
            raise PeerUnavailable(f"peer {rec.name!r} advertises no address")
        return Target(rec.addresses[0], rec.key_id, None if self.config.insecure else rec.cert)

    async def request(self, to: str | PeerRecord, msg, *, timeout: float | None = None,
                      via: str = "auto"):
        """Send `msg` to a peer (name, key id, or record) and return its reply, or raise
        its typed error.

        ``via="auto"`` sends a small message as a call on the push streams (see
        :mod:`p2pgrid.calls`: about half the cost of an HTTP request each way) and a
        large one (tensors of :data:`p2pgrid.calls.INLINE` bytes or more) as an HTTP/2
        request, which streams it; ``"call"`` and ``"http"`` choose.
        """
        if via not in ("auto", "call", "http"):
            raise ValueError(f"via must be 'auto', 'call' or 'http', not {via!r}")
        rec = to if isinstance(to, PeerRecord) else self.record(to)
        if rec.key_id == self.key_id:
            return await self.router.dispatch(self, Caller(self.name, self.identity.public_bytes), msg)
        if via == "call" or (via == "auto" and self.calls.usable()
                             and wire.payload_bytes(msg) < calls.INLINE):
            timeout = self.config.request_timeout if timeout is None else timeout
            return await self.calls.call(rec, msg, timeout=timeout)
        return await self.transport.request(self.target(rec), msg, timeout=timeout)

    async def push(self, to: str | PeerRecord, msg) -> None:
        """Send `msg` one way (see :mod:`p2pgrid.push`): on our own link to that peer if
        one is open, else on the way back of a link it opened to us, else on a new link of
        ours to the address of its signed record; delivered in order, no reply. Breaks are reported to
        `push_listeners`."""
        rec = to if isinstance(to, PeerRecord) else self.record(to)
        if rec.key_id == self.key_id:
            await self.router.dispatch(self, Caller(self.name, self.identity.public_bytes), msg)
            return
        # one route while it lasts: a message sent on another route could overtake
        # those still queued on ours
        if await self.pushers.send_existing(rec.key_id, msg):
            return
        if await self.links.send(rec.key_id, msg):
            return
        # streams are reported by the name the record answers to here: an impostor's
        # record carrying another peer's name must never break that peer's calls
        await self.pushers.push(self.directory.label(rec), self.target(rec), msg,
                                public_key=rec.public_key)

    async def reply(self, key_id: str, msg, *, timeout: float) -> bool:
        """Send `msg` to the peer with `key_id` on a link already open between us: the way
        back of one it opened, else one we opened. Never dials; False if none is open or
        the message could not be sent within `timeout`."""
        if await self.links.send(key_id, msg, timeout=timeout):
            return True
        with trio.move_on_after(timeout):
            return await self.pushers.send_existing(key_id, msg)
        return False

    async def _deliver(self, name: str, public_key: bytes, frame: bytes,
                       address: str = "") -> None:
        """A frame that came back on one of our links, from the peer we pinned it to
        (at `address`, the IP our connection to it reached)."""
        limit = max(self.config.max_body, push.MIN_FRAME)
        msg = wire.decode(frame, max_size=limit, adopt=True)
        try:
            await self.router.dispatch(self, _link_caller(name, public_key, address), msg)
        except P2PError as e:   # nobody to answer, as for a pushed message
            log.debug("%s from %s on its way back refused: %s", type(msg).__name__, name, e.code)

    async def call(self, to: str | PeerRecord, msg, *, timeout: float | None = None):
        """:meth:`request` as a call whatever the message's size (a large one still
        goes as a request: see :meth:`p2pgrid.calls.Calls.call`)."""
        return await self.request(to, msg, timeout=timeout, via="call")

    def _stream_cut(self, name: str, why: str) -> None:
        # A peer whose stream to us was cut has likely gone (a restart, say): our
        # stream to it goes too, rather than lose the next message on a dead connection.
        self.pushers.drop(name)
        self.pushers.report(name, why)

    @property
    def push_listeners(self) -> list:
        """Callables (peer name, why) told when a push stream to or from a peer breaks."""
        return self.pushers.listeners

    def add_seed(self, address: str, key_id: str | None = None) -> None:
        """Somewhere to gossip with: from --join, mDNS, or a test harness."""
        if "@" in address:
            key_id, address = address.split("@", 1)
        if address not in self.addresses:
            self._seeds.setdefault(address, key_id)

    def _unknown_seeds(self) -> list[str]:
        known = {a for rec in self.directory.peers() for a in rec.addresses}
        return [a for a in self._seeds if a not in known]

    async def _gossip_send(self, address: str, msg, key_id: str | None = None):
        if key_id is not None:
            # Pinned to the record gossip chose: another record claiming the same
            # address cannot stand in for it (see p2pgrid.addrbook).
            try:
                rec = self.directory.lookup(key_id)
            except NotFound:
                raise PeerUnavailable(f"peer {key_id} is no longer known") from None
            target = Target(address, rec.key_id, None if self.config.insecure else rec.cert)
            return await self.transport.request(target, msg, timeout=self.config.ttl)
        expected = self._seeds.get(address)
        for rec in self.directory.peers():
            if address in rec.addresses and rec.key_id != self.key_id and (
                    expected is None or rec.key_id == expected):
                return await self.transport.request(self.target(rec), msg, timeout=self.config.ttl)
        try:
            target = self._learned.get(address)
            if target is None:
                target = await learn_target(address, expect_key_id=self._seeds.get(address),
                                            insecure=self.config.insecure)
                self._learned[address] = target
            try:
                return await self.transport.request(target, msg, timeout=self.config.ttl)
            except Unauthenticated:
                self._learned.pop(address, None)
                raise
        except (Unauthenticated, PeerUnavailable) as e:
            self._warn_seed(address, e)
            raise

    def _warn_seed(self, address: str, e) -> None:
        # A seed (--join, mDNS) that answers with the wrong key or not at all is said
        # once at the default level: a mistyped --join must not fail silently.
        if address in self._seeds_warned:
            return
        self._seeds_warned.add(address)
        if isinstance(e, Unauthenticated):
            log.warning("%s: seed %s is not the peer --join named: %s", self.name, address,
                        e.message)
        else:
            log.warning("%s: seed %s unreachable (%s); still trying", self.name, address,
                        e.message)

    # ------------------------------------------------------------ services

    async def _serve(self, port: int | None = None, task_status=trio.TASK_STATUS_IGNORED):
        certfile = keyfile = None
        if not self.config.insecure:
            certfile, keyfile = tls.server_context_files(self.identity, self.cert,
                                                         self.config.data_dir / "tls")
        card = wire.dumps({"name": self.name, "public_key": self.identity.public_bytes})
        app = App(self.verifier, self.authorize, lambda c, m: self.router.dispatch(self, c, m),
                  max_body=self.config.max_body, page=self._page, identity_card=card,
                  push_broken=self._stream_cut, pull=self.links.serve,
                  push_ended=lambda caller, link: self.links.close(caller.key_id, link),
                  limits=self.config.edge_limits(), registered=self.registered)
        await serve(app, host=self.config.host, port=self.config.port if port is None else port,
                    certfile=certfile,
                    keyfile=keyfile, task_status=task_status)

    async def _page(self, scope, body):
        if self.page is None:
            from .web import render_status
            return 200, "text/html; charset=utf-8", render_status(self).encode()
        return await self.page(self, scope, body)

    async def _housekeeping(self):
        while True:
            await trio.sleep(max(self.config.gossip_interval * 5, 1.0))
            expired = await trio.to_thread.run_sync(self.store.expire)
            buffers.POOL.trim()
            if any(self._summaries.pop(i, None) for i in expired):
                self.reissue()
            self.save_bindings()
            self.state_save_known_peers()
            self._reload_revocations()
            self.recheck_members()


    # ------------------------------------------------------------ what survives a restart
    # Identity, certificate, store and name bindings live in their own files; here
    # are the last port and the peers we knew, so a restarted peer is found where
    # it was and finds the others without mDNS or --join.

    def state_save_port(self, port: int) -> None:
        (self.config.data_dir / "port").write_text(f"{port}\n")

    def state_saved_port(self) -> int | None:
        try:
            return int((self.config.data_dir / "port").read_text())
        except (OSError, ValueError):
            return None

    def state_known_peers(self) -> list[str]:
        try:
            items = wire.loads((self.config.data_dir / "peers.cbor").read_bytes())
            return [f"{i['key_id']}@{i['address']}" for i in items]
        except Exception:  # missing or damaged: only costs rediscovery
            return []

    def state_save_known_peers(self) -> None:
        items = [{"key_id": r.key_id, "address": a} for r in self.directory.peers()
                 if r.key_id != self.key_id for a in r.addresses[:1]]
        if items:
            path = self.config.data_dir / "peers.cbor"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(wire.dumps(items))
            tmp.replace(path)

    def save_bindings(self) -> None:
        current = self.directory.bindings()
        if current != self._saved_bindings:
            tmp = self._bindings_path.with_suffix(".tmp")
            tmp.write_bytes(wire.dumps(current))
            tmp.replace(self._bindings_path)
            self._saved_bindings = current


def _rules_text(r: Rules) -> str:
    return "; ".join(f"{right} {','.join(getattr(r, right)) or '-'}"
                     for right in ("compute", "get", "aggregate")) + f"; min_rows {r.min_rows}"


@functools.lru_cache(maxsize=1024)
def _link_caller(name: str, public_key: bytes, address: str) -> Caller:
    # one per link rather than one per frame: a Caller hashes its key for key_id once
    return Caller(name, public_key, address=address)


async def _encode_push(msg) -> bytes:
    return await maybe_thread(wire.payload_bytes(msg), wire.encode_buffer, msg)


def directory_limits(config: PeerConfig) -> BookLimits:
    """The address book's bounds from a peer's config (one round = one gossip interval;
    protection outlasts a few ttl so a brief outage does not cost it)."""
    return BookLimits(max_records=config.max_records, new_per_source=config.gossip_new_per_source,
                      window=config.gossip_interval, max_protected=config.protected_peers,
                      protected_ttl=8 * config.ttl)


def summary_of(meta: ObjectMeta) -> ObjectSummary:
    return ObjectSummary(id=meta.id, tags=list(meta.tags), description=meta.description,
                         shape=list(meta.shape), dtype=meta.dtype, owner=meta.owner,
                         level=meta.level, columns=list(meta.columns))


@asynccontextmanager
async def open_peer(config: PeerConfig, *, routers: Iterable[Router] = ()) -> AsyncIterator[Peer]:
    """Run a peer for the duration of the block: server, gossip, mDNS, housekeeping."""
    buffers.tune_allocator()   # transfers' buffers stay warm (see p2pgrid.buffers)
    peer = Peer(config, routers)
    try:
        async with _unwrapped(), trio.open_nursery() as nursery:
            peer.nursery = nursery
            peer.pushers.nursery = nursery
            peer.calls.nursery = nursery
            port = 0
            if config.listen:
                binds = await _start_server(nursery, peer)
                port = int(binds[0].rsplit(":", 1)[1])
                peer.state_save_port(port)
                peer.addresses = advertised_addresses(config, port)
                from .owner import write_endpoint
                local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(
                    config.host, config.host)
                write_endpoint(config.data_dir, peer.name, f"{local}:{port}", config.insecure)
            peer._summaries = {m.id: summary_of(m) for m in await trio.to_thread.run_sync(
                peer.store.list) if peer.advertises(m)}
            if len(peer._summaries) > MAX_SUMMARIES:
                log.warning("%s: %d published objects; the record lists the first %d",
                            peer.name, len(peer._summaries), MAX_SUMMARIES)
                peer._summaries = dict(list(peer._summaries.items())[:MAX_SUMMARIES])
            for item in config.publish:
                await _publish_profile_item(peer, item)
            for seed in list(config.join) + peer.state_known_peers():
                peer.add_seed(seed)
            peer.reissue()
            await nursery.start(lambda task_status: gossip_loop(
                peer.directory, peer._gossip_send, interval=config.gossip_interval,
                fanout=config.gossip_fanout, reissue=peer.heartbeat, seeds=peer._unknown_seeds,
                clock=time.monotonic, timeout=max(config.gossip_interval, 5.0),
                task_status=task_status))
            if config.mdns:
                from .discovery import run_discovery
                await nursery.start(lambda task_status: run_discovery(
                    name=peer.name, key_id=peer.key_id, port=port,
                    interfaces=mdns_interfaces(config), announce=config.listen,
                    on_found=lambda address, info: peer.add_seed(address, info.get("key_id")),
                    task_status=task_status))
            nursery.start_soon(peer._housekeeping)
            nursery.start_soon(check_clock, peer)
            if peer.membership is None:
                log.warning("%s: no network key, so names are trusted on first use (the first "
                            "key to claim a name owns it here); pin peers with --join "
                            "KEYID@HOST:PORT or run a network key (p2pgrid network --help)",
                            peer.name)
            from . import plugins
            for service in plugins.services():
                await nursery.start(service, peer)
            try:
                yield peer
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await peer.transport.aclose()
        peer.save_bindings()
        peer.state_save_known_peers()
        peer.store.close()


@asynccontextmanager
async def _unwrapped():
    """Re-raise the one exception a nursery wrapped in a group as itself: a script's
    own error (or KeyboardInterrupt) from inside ``async with connect(...)`` reaches it
    as it was raised, not inside a (Base)ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        exc = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from exc.__cause__


def mdns_interfaces(config: PeerConfig) -> list[str] | None:
    """Where mDNS runs: the configured interfaces, else where we listen (a peer on one
    address announces itself there only, not where nobody can reach it), else all."""
    if config.mdns_interfaces:
        return list(config.mdns_interfaces)
    if config.listen and config.host not in WILDCARDS:
        return [config.host]
    return None


async def _start_server(nursery: trio.Nursery, peer: Peer) -> list[str]:
    """Listen on the configured port, else on the port of the last run, else any."""
    saved = peer.state_saved_port() if peer.config.port == 0 else None
    if saved:
        try:
            return await nursery.start(peer._serve, saved)
        except OSError:
            log.info("port %d of the last run is taken; using another", saved)
    return await nursery.start(peer._serve)


async def _publish_profile_item(peer: Peer, item: dict) -> None:
    from .datasets import dataset_with_columns

    name = item.get("id") or item.get("name")
    existing = {m.id: m for m in await trio.to_thread.run_sync(peer.store.list)}
    if name in existing:
        # Published on an earlier start: restarts keep data, not duplicates. The
        # profile is the owner's statement of the rules, so its rules win over
        # stored ones (changed since from the CLI or console), and the log says so.
        wanted = Rules(compute=tuple(item.get("compute", ())), get=tuple(item.get("get", ())),
                       aggregate=tuple(item.get("aggregate", ())),
                       min_rows=peer.config.min_rows if item.get("min_rows") is None
                       else item["min_rows"])
        if existing[name].rules != wanted:
            log.warning("%s: %s: stored rules differ from the profile's; applying the "
                        "profile's (%s)", peer.name, name, _rules_text(wanted))
            await peer.set_rules(name, lambda old: wanted, by=peer.name, why="profile")
        return
    tensor, columns = await trio.to_thread.run_sync(dataset_with_columns, item)
    await peer.publish(tensor, tags=item.get("tags", ()), description=item.get("description", ""),
                       compute=item.get("compute", ()), get=item.get("get", ()),
                       aggregate=item.get("aggregate", ()), min_rows=item.get("min_rows"), id=name,
                       bounds=item.get("bounds"), epsilon=item.get("epsilon"), columns=columns)
