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
    host: str = "127.0.0.1"              # where the HTTP/2 server listens
    port: int = 0                        # 0: any free port
    advertise: str | None = None         # host others should dial (default: host)
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
    # Network membership (p2pgrid.membership). With the network's public key (64 hex
    # digits), only peers and users certified by it are heard; without, names are
    # trusted on first use.
    network_key: str | None = None
    cert: Path | str | None = None          # this peer's certificate (`p2pgrid network invite`)
    revocations: Path | str | None = None   # a revocation list file to read and spread
    publish: tuple[dict, ...] = field(default=(), repr=False)  # datasets from a profile

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
        if self.mdns_interfaces is not None:
            object.__setattr__(self, "mdns_interfaces", tuple(self.mdns_interfaces))

    def with_(self, **changes) -> "PeerConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_profile(path: Path | str, **overrides) -> PeerConfig:
    """Read a peer profile (TOML): ``[peer]`` keys of PeerConfig, ``[[dataset]]`` to publish."""
    data = tomllib.loads(Path(path).read_text())
    peer = dict(data.get("peer", {}))
    known = {f.name for f in fields(PeerConfig)}
    unknown = set(peer) - known
    if unknown:
        raise ValueError(f"{path}: unknown [peer] keys {sorted(unknown)}")
    peer["publish"] = tuple(data.get("dataset", ()))
    peer.update({k: v for k, v in overrides.items() if v is not None})
    if "name" not in peer:
        raise ValueError(f"{path}: [peer] needs a name")
    return PeerConfig(**peer)
