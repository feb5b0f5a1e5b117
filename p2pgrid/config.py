"""Peer configuration and TOML profiles.

>>> cfg = PeerConfig(name="clinic", data_dir="/tmp/clinic")
>>> cfg.port, cfg.insecure
(0, False)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


def default_home() -> Path:
    return Path(os.environ.get("P2PGRID_HOME", Path.home() / ".p2pgrid"))


@dataclass(frozen=True)
class PeerConfig:
    name: str
    data_dir: Path | str | None = None   # default: $P2PGRID_HOME/<name>
    host: str = "127.0.0.1"              # where the HTTP/2 server listens (0.0.0.0: everywhere)
    port: int = 0                        # 0: any free port
    advertise: str | None = None         # host others should dial (default: host, or for a
                                         # wildcard host the addresses of our interfaces)
    listen: bool = True                  # False: a client that only dials out (no server)
    insecure: bool = False               # cleartext h2c instead of pinned TLS
    join: tuple[str, ...] = ()           # seeds: "host:port" or "KEYID@host:port"
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] | None = None
    roles: tuple[str, ...] = ()          # e.g. ("crypto-provider",)
    # SMPC trust, decided here and never taken from a record: the peers this peer lets
    # hold shares of its data (besides itself), and the crypto providers it lets deal for
    # them (a role a peer announces for itself counts for nothing). See docs/SECURITY.md.
    smpc_parties: tuple[str, ...] = ()
    crypto_providers: tuple[str, ...] = ()
    # "active": this peer shares its data only with MAC-checked shares (security="active",
    # p2pgrid.protocols.smpc.mac), so a cheating party is caught; semi-honest sharing is refused
    smpc_security: str = "semi-honest"
    # tests only (tests/adversarial/test_smpc_cheating.py): this peer deviates in active
    # sessions ("add1": adds 1 to a share it sends). No profile or message can set it.
    smpc_test_cheat: str = field(default="", repr=False)
    gossip_interval: float = 1.0
    gossip_fanout: int = 2
    ttl: float = 15.0                    # a peer unheard of for this long is dropped
    max_record_ttl: float | None = None  # a record's own longer ttl honoured up to this (4 * ttl)
    max_records: int = 10_000            # directory records kept (a fair eviction beyond)
    gossip_new_per_source: int = 256     # new keys one gossip partner may introduce per round
    protected_peers: int = 64            # peers reached recently that gossip always draws from
    max_body: int = 1 << 30
    min_rows: int = 10                   # default records an aggregate must span
    result_ttl: float = 3600.0           # unfetched results expire after this
    request_timeout: float = 120.0
    # What callers can make the HTTP/2 edge hold (see p2pgrid.limits.EdgeLimits)
    max_connections: int | None = None   # None: sized from the open-file limit
    max_connections_per_address: int | None = None  # None: an eighth of max_connections
    max_streams: int = 100               # concurrent streams per connection
    handshake_timeout: float = 10.0      # seconds for a TLS handshake
    idle_timeout: float = 30.0           # a connection without an open stream closes after this
    read_timeout: float = 45.0           # a request body (push stream) silent this long: 408
    write_timeout: float = 60.0          # a reply the client does not take: connection closed
    requests_per_key: int = 32           # requests and push streams open at once per caller key
    requests_unregistered: int = 256     # the same, for all unregistered keys together
    # The most of each pool that unregistered callers share (requests_unregistered above,
    # serving rate limits and quotas, the privacy budget) that those from one client
    # address (an IPv6 /64) may take together: names are free, addresses are not.
    guest_address_share: float = 0.5
    # Objects others store here (PutObject); the peer itself and its owner role are exempt
    store_quota_count: int = 1000        # objects per caller
    store_quota_bytes: int = 1 << 30     # bytes per caller
    store_total_count: int = 20000       # objects of all callers together
    store_total_bytes: int = 8 << 30     # bytes of all callers together
    # what one caller's remote program may cost (p2pgrid.budget.Limits has the defaults)
    program_memory: int | None = None        # bytes held at once by the whole program
    program_flops: float | None = None       # floating-point operations per program
    program_seconds: float | None = None     # wall clock of the real run
    programs_running: int | None = None      # programs one caller may have running at once
    program_limits: dict = field(default_factory=dict, repr=False)  # caller or "*" -> overrides
    program_workers: int = 2                 # worker processes that run programs at once
    program_inline_flops: float = 2e7        # smaller programs run in a thread, without a worker
    # Network membership (p2pgrid.membership). With the network's public key (64 hex
    # digits), only peers and users certified by it are heard; without, names are
    # trusted on first use.
    network_key: str | None = None
    cert: Path | str | None = None          # this peer's certificate (`p2pgrid network invite`)
    revocations: Path | str | None = None   # a revocation list file to read and spread
    publish: tuple[dict, ...] = field(default=(), repr=False)  # datasets from a profile
    console: bool = True                 # serve the owner's console (one-shot peers do not)

    def __post_init__(self):
        if self.data_dir is None:
            object.__setattr__(self, "data_dir", default_home() / self.name)
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "join", tuple(self.join))
        object.__setattr__(self, "roles", tuple(self.roles))
        for key in ("smpc_parties", "crypto_providers"):
            names = tuple(getattr(self, key))
            if any(not isinstance(n, str) or not n or n == "*" for n in names):
                raise ValueError(f"{key} lists peer names (no '*': each one is trusted "
                                 "not to collude)")
            object.__setattr__(self, key, names)
        if self.smpc_security not in ("semi-honest", "active"):
            raise ValueError("smpc_security is 'semi-honest' or 'active'")
        if isinstance(self.guest_address_share, bool) or \
                not isinstance(self.guest_address_share, (int, float)) or \
                not 0.0 < self.guest_address_share <= 1.0:
            raise ValueError(f"guest_address_share is a fraction in (0, 1], not "
                             f"{self.guest_address_share!r}")
        if self.mdns_interfaces is not None:
            object.__setattr__(self, "mdns_interfaces", tuple(self.mdns_interfaces))

    def edge_limits(self):
        """The HTTP/2 edge's limits from this config (a p2pgrid.limits.EdgeLimits)."""
        from .limits import EdgeLimits
        return EdgeLimits(**{f.name: getattr(self, f.name) for f in fields(EdgeLimits)})

    def with_(self, **changes) -> "PeerConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


DATASET_KEYS = ("id", "name", "path", "tensor", "generator", "rows", "seed", "month", "part",
                "shape", "tags", "description", "compute", "get", "aggregate", "min_rows",
                "bounds", "epsilon")


class ProfileError(ValueError):
    """A profile that cannot be used; the message says where and what to do."""


def _check_keys(path, where: str, keys, known) -> None:
    import difflib

    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else \
                f" (known: {', '.join(sorted(known))})"
            raise ProfileError(f"{path}: unknown key {key!r} in {where}{hint}")


WILDCARDS = ("0.0.0.0", "::", "")


def interface_ipv4s() -> list[str]:
    """This host's IPv4 addresses, loopback last (only where there is nothing else)."""
    import ifaddr  # a zeroconf dependency

    ips = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
           if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
    return list(dict.fromkeys(ips)) or ["127.0.0.1"]


def advertised_addresses(config: PeerConfig, port: int) -> list[str]:
    """Where others should dial a peer listening on `port`: never a wildcard address."""
    if config.advertise:
        hosts = [config.advertise]
    elif config.host in WILDCARDS:
        hosts = interface_ipv4s()
    else:
        hosts = [config.host]
    return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts]


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def load_profile(path: Path | str, **overrides) -> PeerConfig:
    """Read a peer profile (TOML): ``[peer]`` keys of PeerConfig, ``[[dataset]]`` to publish.

    Unknown keys are errors naming the nearest known one; a dataset's ``path`` is
    relative to the profile's folder."""
    from .datasets import GENERATORS

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no profile at {path}") from None
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    _check_keys(path, "the profile", data, ("peer", "dataset"))
    peer = dict(data.get("peer", {}))
    _check_keys(path, "[peer]", peer, {f.name for f in fields(PeerConfig)} - {"publish", "smpc_test_cheat"})
    items = []
    for n, item in enumerate(data.get("dataset", ()), 1):
        where = f"[[dataset]] {item.get('id') or n}"
        _check_keys(path, where, item, DATASET_KEYS)
        item = dict(item)
        if item.get("path"):
            item["path"] = str((path.parent / item["path"]).expanduser())
        elif item.get("generator", "birth_records") not in GENERATORS:
            raise ProfileError(f"{path}: {where}: unknown generator {item['generator']!r} "
                               f"(one of {', '.join(GENERATORS)}; or give path = FILE)")
        items.append(item)
    peer["publish"] = tuple(items)
    peer.update({k: v for k, v in overrides.items() if v is not None})
    if "name" not in peer:
        raise ProfileError(f"{path}: [peer] needs a name (or give --name)")
    return PeerConfig(**peer)
