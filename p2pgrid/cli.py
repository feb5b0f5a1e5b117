"""The ``p2pgrid`` command: run a peer, search the network, run the local demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from . import patchguard
from .config import PeerConfig, is_loopback, load_profile

EPILOG = """examples:
  p2pgrid peer --name hospital --profile peers/hospital.toml
  p2pgrid peer --name clinic --join 127.0.0.1:7001
  p2pgrid search '#birth-records' --as bob
  p2pgrid demo
  p2pgrid network init                       (a network whose members hold certificates)
"""


def add_network_options(p: argparse.ArgumentParser) -> None:
    """--join, --no-mdns, --interface, --insecure, --data-dir, --as, --wait."""
    _common_net(p)
    if not any(a.dest == "name" for a in p._actions):
        p.add_argument("--as", dest="name", default=None, help="your name on the network (default: $USER)")
    if not any(a.dest == "wait" for a in p._actions):
        p.add_argument("--wait", type=float, default=5.0, help="seconds to wait for peers (default 5)")


def _common_net(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--join", action="append", default=[], metavar="[KEYID@]HOST:PORT",
                   help="a peer to gossip with first (repeatable); KEYID pins its key")
    g.add_argument("--no-mdns", dest="mdns", action="store_false",
                   help="do not advertise or browse with mDNS/zeroconf")
    g.add_argument("--interface", action="append", dest="interfaces", metavar="IP",
                   help="run mDNS only on this IPv4 address (repeatable; default: all)")
    g.add_argument("--insecure", action="store_true",
                   help="speak cleartext HTTP/2 (h2c) instead of TLS pinned to peer keys; "
                        "every peer of the network must use it")
    g.add_argument("--data-dir", type=Path, help="where keys and data live "
                   "(default: $P2PGRID_HOME/NAME, $P2PGRID_HOME defaults to ~/.p2pgrid)")
    g.add_argument("--network-key", metavar="PUB",
                   help="the network's public key (printed by `p2pgrid network init`): hear only "
                        "peers and users holding a certificate it signed; needs --cert. Without "
                        "it, names are trusted on first use")
    g.add_argument("--cert", type=Path, metavar="FILE",
                   help="this peer's membership certificate (from `p2pgrid network invite`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pgrid", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="A peer-to-peer network for private machine learning. Every participant "
                    "runs the same peer; peers find each other by mDNS or --join, gossip a "
                    "directory of who holds which data, and run computations where data lives.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("peer", help="run a peer until Ctrl-C",
                       description="Run a peer: HTTP/2 server, gossip directory, mDNS. Keeps its "
                                   "identity and data in its data dir across restarts.")
    p.add_argument("--name", help="the peer's name (required unless the profile sets it)")
    p.add_argument("--profile", type=Path, help="a TOML profile (see peers/*.toml)")
    p.add_argument("--host", default=None,
                   help="address to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0: every interface, to serve a LAN)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: any free)")
    p.add_argument("--advertise", help="host others should dial (default: --host, or for "
                                       "0.0.0.0 this machine's interface addresses)")
    p.add_argument("--role", action="append", dest="roles", help="e.g. crypto-provider (repeatable)")
    p.add_argument("--smpc-party", action="append", dest="smpc_parties", metavar="PEER",
                   help="a peer this peer lets hold SMPC shares of its data (repeatable)")
    p.add_argument("--crypto-provider", action="append", dest="crypto_providers", metavar="PEER",
                   help="a peer this peer lets deal SMPC material for its data (repeatable)")
    p.add_argument("--ttl", type=float, default=None,
                   help="seconds a peer unheard of stays in the directory (default 15); this "
                        "peer re-announces itself every ttl/3")
    p.add_argument("--gossip-interval", type=float, default=None,
                   help="seconds between gossip rounds (default 1)")
    p.add_argument("--revocations", type=Path, metavar="FILE",
                   help="a revocation list file (`p2pgrid network revoke` writes it): read again "
                        "when it changes, and spread to the other members by gossip")
    _common_net(p)

    s = sub.add_parser("search", help="find published data by tag",
                       description="Join the network briefly and print the objects whose tags "
                                   "match all of QUERY's, e.g. '#february #birth-records'.")
    s.add_argument("query", help="tags, e.g. '#birth-records'")
    s.add_argument("--as", dest="name", default=None, help="your name on the network (default: $USER)")
    s.add_argument("--wait", type=float, default=5.0, help="seconds to look (default 5)")
    s.add_argument("--json", action="store_true", help="print JSON")
    _common_net(s)

    ps = sub.add_parser("peers", help="list the peers in the directory",
                        description="Join the network briefly and list the peers it knows.")
    ps.add_argument("--as", dest="name", default=None, help="your name on the network (default: $USER)")
    ps.add_argument("--wait", type=float, default=3.0, help="seconds to listen (default 3)")
    ps.add_argument("--json", action="store_true", help="print JSON")
    _common_net(ps)

    d = sub.add_parser("demo", help="run a local demo network and the private-statistics walk-through",
                       description="Start hospital, clinic, university and company peers on "
                                   "127.0.0.1 (real HTTP/2 over TLS, gossip), then, as the data "
                                   "scientist bob: search by tag, compute a mean remotely, and "
                                   "be refused the raw rows.")
    d.add_argument("--keep-running", action="store_true", help="keep the peers up afterwards")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="where the demo peers keep state (default: a temporary directory)")
    _network_parser(sub)
    from . import owner_cli, plugins
    parser.plugin_runners = {**owner_cli.add_cli(sub), **plugins.cli_extensions(sub)}
    return parser


def _user() -> str:
    return os.environ.get("USER") or os.environ.get("USERNAME") or "cli"


async def _until_signalled(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            cancel_scope.cancel()
            return


async def run_peer(args) -> int:
    from .peer import open_peer

    bad = check_join(args.join)
    if bad:
        print(f"p2pgrid peer: {bad}", file=sys.stderr)
        return 2
    overrides = dict(name=args.name, host=args.host, port=args.port, advertise=args.advertise,
                     ttl=args.ttl, gossip_interval=args.gossip_interval,
                     data_dir=args.data_dir, insecure=args.insecure or None,
                     mdns=None if args.mdns else False,
                     mdns_interfaces=tuple(args.interfaces) if args.interfaces else None,
                     network_key=args.network_key, cert=args.cert, revocations=args.revocations)
    if args.profile:
        cfg = load_profile(args.profile, **overrides)
    elif args.name:
        cfg = PeerConfig(**{k: v for k, v in overrides.items() if v is not None})
    else:
        print("p2pgrid peer: give --name or --profile", file=sys.stderr)
        return 2
    cfg = cfg.with_(join=tuple(cfg.join) + tuple(args.join),
                    roles=tuple(cfg.roles) + tuple(args.roles or ()),
                    smpc_parties=tuple(cfg.smpc_parties) + tuple(args.smpc_parties or ()),
                    crypto_providers=tuple(cfg.crypto_providers) + tuple(args.crypto_providers or ()))
    with trio.CancelScope() as scope:
        async with open_peer(cfg) as peer, trio.open_nursery() as nursery:
            nursery.start_soon(_until_signalled, scope)
            print(f"peer {peer.name} up at {peer.address} (key {peer.key_id})", flush=True)
            print(f"  public key: {peer.identity.public_bytes.hex()}", flush=True)
            if peer.membership is not None:
                print(f"  member of network {peer.membership.network}: certified peers only",
                      flush=True)
            # the peer's own https:// address is for peers (an Ed25519 certificate no
            # browser takes); the console's link, printed by governance, is for browsers
            print(f"  data:  {cfg.data_dir}", flush=True)
            for s in peer._summaries.values():
                print(f"  publishes {s.id} {tuple(s.shape)} {' '.join('#' + t for t in s.tags)}",
                      flush=True)
            if len(peer.addresses) > 1:
                print(f"  also at: {' '.join(peer.addresses[1:])}", flush=True)
            if is_loopback(cfg.host):
                print(f"  local only: listening on {cfg.host}, so peers on other machines "
                      f"cannot reach it; to serve your network, start it with --host 0.0.0.0 "
                      f"(or --host THIS-MACHINE'S-LAN-ADDRESS)", flush=True)
            print(f"  join:  --join {peer.key_id}@{peer.address}", flush=True)
            await trio.sleep_forever()
    print("peer stopped", flush=True)
    return 0


async def _ephemeral(args):
    """A short-lived peer of the user's own, joined to the network (for one command).
    Plugin subcommands use it too: add the network options with ``add_network_options``.

    It serves no owner console, and keeps its data only where asked (--data-dir) or
    where the name already has an identity ($P2PGRID_HOME/NAME, so that owners who
    registered its key recognise it); otherwise it lives in a temporary directory."""
    from .errors import BadRequest

    bad = check_join(args.join)
    if bad:
        raise BadRequest(bad)
    return _one_shot(args)


@asynccontextmanager
async def _one_shot(args):
    import shutil
    import tempfile

    from .config import default_home
    from .network import connect

    name = getattr(args, "name", None)
    if not name:
        name = _user()
        if not (os.environ.get("USER") or os.environ.get("USERNAME")):
            print(f"p2pgrid: $USER is not set; your name on the network is {name!r} "
                  "(give --as NAME)", file=sys.stderr)
    data_dir, temp = args.data_dir, None
    if data_dir is None:
        # a throwaway store, but your own key: a throwaway key would claim your name on
        # every peer it reaches (trust on first use) and lock your next script out of it
        from .identity import Identity
        key = default_home() / name / "identity.key"
        Identity.load_or_create(key)
        data_dir = temp = Path(tempfile.mkdtemp(prefix=f"p2pgrid-{name}-"))
        shutil.copy2(key, temp / "identity.key")
    try:
        async with connect(name, join=args.join, mdns=args.mdns, interfaces=args.interfaces,
                           insecure=args.insecure, data_dir=data_dir, wait=args.wait,
                           network_key=getattr(args, "network_key", None),
                           cert=getattr(args, "cert", None), console=False) as net:
            yield net
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


async def run_search(args) -> int:
    async with await _ephemeral(args) as net:
        hits = await net.search(args.query, wait=args.wait)
        d = net.me.directory
        keys = {d.label(r): r.key_id for r in d.peers()}
        reached = [r for r in d.peers() if r.key_id != net.me.key_id]
        trust = _trust(net.me)
    if args.json:
        print(json.dumps({p: [ptr.meta for ptr in ptrs] for p, ptrs in hits.items()}, indent=2))
        return 0 if hits else 1
    if not hits:
        if not reached:
            print(f"no peer reached in {args.wait:g}s, so nothing was searched; give --join "
                  "KEYID@HOST:PORT (as `p2pgrid peer` prints it) or check that mDNS works here",
                  file=sys.stderr)
            return 1
        print(f"nothing matches {args.query!r} on {len(reached)} peer(s)", file=sys.stderr)
        return 1
    print(f"{'PEER':<12} {'KEY':<17} {'ID':<34} {'SHAPE':<14} {'DTYPE':<9} DESCRIPTION / TAGS")
    for peer, ptrs in sorted(hits.items()):
        for p in ptrs:
            print(f"{peer:<12} {keys.get(peer, ''):<17} {p.id:<34} {str(tuple(p.shape)):<14} "
                  f"{str(p.dtype).removeprefix('torch.'):<9} {p.description}")
            print(f"{'':<90} {' '.join('#' + t for t in p.tags)}")
    print(trust)
    return 0


def _trust(peer) -> str:
    """One line saying what the names above are worth."""
    if peer.membership is not None:
        return f"(names certified by network {peer.membership.network})"
    return ("(names trusted on first use: check the KEY fingerprints, pin them with "
            "--join KEYID@HOST:PORT, or use a network key)")


async def run_peers(args) -> int:
    async with await _ephemeral(args) as net:
        await trio.sleep(min(args.wait, 1.0))
        d = net.me.directory
        recs = [r for r in d.peers() if r.key_id != net.me.key_id]
        trust = _trust(net.me)
        member = net.me.membership is not None
    rows = [{"name": d.label(r), "key_id": r.key_id, "addresses": r.addresses, "roles": r.roles,
             "objects": len(r.objects), "certified": member} for r in recs]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<14} {r['key_id']}  {','.join(r['addresses']):<22} "
                  f"{','.join(r['roles']):<16} {r['objects']} object(s)")
        print(trust)
    return 0


def _network_parser(sub) -> None:
    n = sub.add_parser(
        "network", help="run a network whose members hold certificates (init, invite, revoke)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Whoever runs the network (a hospital consortium, say) keeps a network key "
                    "and signs a certificate per member, binding its name to its peer key until a "
                    "date. Peers started with --network-key PUB --cert FILE hear certified peers "
                    "and users only; a revocation list signed by the same key takes members out "
                    "and spreads by gossip.",
        epilog="examples:\n  p2pgrid network init\n"
               "  p2pgrid network invite hospital 3f9c...e1 --days 365   (key: `p2pgrid peer` "
               "prints it)\n  p2pgrid peer --name hospital --network-key PUB --cert hospital.cert\n"
               "  p2pgrid network revoke hospital")
    nsub = n.add_subparsers(dest="action", required=True, metavar="ACTION")
    default_key = "$P2PGRID_HOME/network.key"

    def key_option(p):
        p.add_argument("--key", type=Path, default=None, metavar="FILE",
                       help=f"the network's private key (default {default_key}); keep it off "
                            f"the peers, readable by its owner only")

    i = nsub.add_parser("init", help="create the network key and print its public key",
                        description="Create the network's Ed25519 key (mode 0600) and print the "
                                    "public key every member starts with (--network-key).")
    key_option(i)
    v = nsub.add_parser("invite", help="certify NAME for a peer key",
                        description="Write a certificate binding NAME to a peer's public key "
                                    "(printed by `p2pgrid peer` at start, or by `p2pgrid users "
                                    "key`), valid for --days days. A 16-hex key id works too, but "
                                    "binds 64 bits of the key only.")
    v.add_argument("name", help="the member's peer or user name")
    v.add_argument("peer_key", metavar="PEER_PUBKEY_OR_KEYID",
                   help="its public key (64 hex digits or base64url; after `--` if it begins "
                        "with '-'), or its key id")
    v.add_argument("--days", type=float, default=365.0, help="validity in days (default 365)")
    v.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="where to write the certificate (default NAME.cert; '-' prints it)")
    key_option(v)
    r = nsub.add_parser("revoke", help="take NAME or KEYID out of the network",
                        description="Add NAME (every certificate issued for it so far) or KEYID "
                                    "(every certificate for that key) to the signed revocation "
                                    "list. Give the file to a member peer (--revocations FILE): "
                                    "it spreads to the others by gossip.")
    r.add_argument("target", metavar="NAME|KEYID", help="a member's name, or a 16-hex key id")
    r.add_argument("--list", dest="crl", type=Path, default=None, metavar="FILE",
                   help="the revocation list to update (default $P2PGRID_HOME/network.crl)")
    key_option(r)


def run_network(args) -> int:
    import time

    from . import membership
    from .config import default_home
    from .identity import Identity

    key_path = args.key or default_home() / "network.key"
    if args.action == "init":
        if key_path.exists():
            print(f"p2pgrid network init: {key_path} exists already; its public key is "
                  f"{Identity.load_or_create(key_path).public_bytes.hex()}", file=sys.stderr)
            return 1
        net = Identity.load_or_create(key_path)   # written 0600, atomically
        print(f"network key written to {key_path} (keep it secret, off the peers)")
        print(f"network id: {net.key_id}")
        print(f"public key (give it to every member: --network-key): {net.public_bytes.hex()}")
        return 0
    if not key_path.exists():
        print(f"p2pgrid network {args.action}: no network key at {key_path} "
              f"(create one with `p2pgrid network init`, or give --key FILE)", file=sys.stderr)
        return 1
    net = Identity.load_or_create(key_path)
    if args.action == "invite":
        text = args.peer_key.strip()
        try:
            peer_key = text.lower() if len(text) == 16 else membership.parse_public_key(text)
            cert = membership.issue(net, args.name, peer_key, days=args.days, now=time.time())
        except ValueError as e:
            print(f"p2pgrid network invite: {e}", file=sys.stderr)
            return 2
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cert.expires_at))
        if args.out is not None and str(args.out) == "-":
            print(membership.b64_certificate(cert))
        else:
            out = args.out or Path(f"{args.name}.cert")
            membership.write_certificate(out, cert)
            print(f"certificate for {args.name!r} (key {cert.key_id}) until {until} written to "
                  f"{out}; the member starts with --network-key {net.public_bytes.hex()} "
                  f"--cert {out}")
        if not cert.public_key:
            print("note: bound to a key id (64 bits of the key); prefer the full public key",
                  file=sys.stderr)
        return 0
    crl_path = args.crl or default_home() / "network.crl"
    target = args.target.strip()
    current = None
    if crl_path.exists():
        try:
            current = membership.read_revocations(crl_path)
            if not membership.Membership(net.public_bytes).offer(current):
                raise ValueError("it is not signed by this network key")
        except (OSError, ValueError) as e:
            print(f"p2pgrid network revoke: {crl_path}: {e}", file=sys.stderr)
            return 1
    is_kid = len(target) == 16 and all(c in "0123456789abcdefABCDEF" for c in target)
    try:
        crl = membership.revoke(net, current, now=time.time(),
                                **({"key_id": target} if is_kid else {"name": target}))
    except ValueError as e:
        print(f"p2pgrid network revoke: {e}", file=sys.stderr)
        return 2
    membership.write_revocations(crl_path, crl)
    print(f"revoked {'key' if is_kid else 'name'} {target}: revocation list {crl.serial} written "
          f"to {crl_path}; give it to a member peer (--revocations {crl_path}) to spread it")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .owner_cli import fix_argv

    parser = build_parser()
    args = parser.parse_args(fix_argv(sys.argv[1:] if argv is None else list(argv)))
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose < 2:
        logging.getLogger("p2pgrid.hypercorn").setLevel(logging.ERROR)
    if args.command != "network" and not patchguard.unpatched():
        try:  # before any peer starts: a bumped library is one line, not a broken peer
            patchguard.check()
        except patchguard.PatchMismatch as e:
            print(f"p2pgrid {args.command}: {e}", file=sys.stderr)
            return 2
    if args.command == "peer":
        # the owner's terminal shows each request filed, denial and release
        logging.getLogger("p2pgrid.access").setLevel(logging.INFO)
    if args.command == "demo":
        from .demo import run_demo
        return trio.run(run_demo, args)
    if args.command == "network":
        return run_network(args)
    runners = {"peer": run_peer, "search": run_search, "peers": run_peers, **parser.plugin_runners}
    runner = runners[args.command]
    from .membership import MembershipError
    try:
        return trio.run(runner, args)
    except KeyboardInterrupt:
        return 130
    except MembershipError as e:
        print(f"p2pgrid {args.command}: {e}", file=sys.stderr)
        return 2
    except BaseException as e:  # noqa: BLE001  (mistakes get one line; bugs a traceback)
        line = one_line(args, e)
        if line is None:
            raise
        print(f"p2pgrid {args.command}: {line}", file=sys.stderr)
        return 130 if line == "interrupted" else 2


def sole(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio's nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def one_line(args, exc: BaseException) -> str | None:
    """What went wrong and what to do, in one line, for the mistakes users make;
    None for anything else (a bug keeps its traceback)."""
    import errno

    from .config import ProfileError
    from .errors import Conflict, P2PError

    exc = sole(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, ProfileError):
        return str(exc)
    if isinstance(exc, Conflict) and "already open" in exc.message:
        where = getattr(args, "data_dir", None) or "its data directory"
        return (f"this peer is already running (its store in {where} is open); stop it "
                "first, or give another --name or --data-dir")
    if isinstance(exc, P2PError):
        return exc.message
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        port = getattr(args, "port", None)
        return (f"port {port} is in use" if port else "the address is in use") + \
            " (another peer or program listens there); pick another --port or stop that one"
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
        return f"cannot listen there: {exc.strerror}; check --host and --port"
    return None


_JOIN = re.compile(r"(?:(?P<kid>[^@\s]+)@)?(?P<host>\[[0-9a-fA-F:.]+\]|[^@:\s\[\]]+):(?P<port>\d{1,5})")


def check_join(seeds) -> str | None:
    """Why a --join value is unusable (one line), or None if all are HOST:PORT or
    KEYID@HOST:PORT with KEYID 16 hex digits."""
    for s in seeds:
        m = _JOIN.fullmatch(s)
        if m is None or not 0 < int(m["port"]) < 65536:
            return f"--join {s!r}: give HOST:PORT or KEYID@HOST:PORT (as `p2pgrid peer` prints it)"
        if m["kid"] is not None and not re.fullmatch(r"[0-9a-f]{16}", m["kid"]):
            return f"--join {s!r}: KEYID is the 16 hex digits a peer prints, before the @"
    return None


if __name__ == "__main__":
    sys.exit(main())
