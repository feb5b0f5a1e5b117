"""The ``p2pgrid`` command: run a peer, search the network, run the local demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from .config import PeerConfig, load_profile

EPILOG = """examples:
  p2pgrid peer --name hospital --profile peers/hospital.toml
  p2pgrid peer --name clinic --join 127.0.0.1:7001
  p2pgrid search '#birth-records' --as bob
  p2pgrid demo
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
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: any free)")
    p.add_argument("--advertise", help="host others should dial, if not --host")
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

    overrides = dict(name=args.name, host=args.host, port=args.port, advertise=args.advertise,
                     ttl=args.ttl, gossip_interval=args.gossip_interval,
                     data_dir=args.data_dir, insecure=args.insecure or None,
                     mdns=None if args.mdns else False,
                     mdns_interfaces=tuple(args.interfaces) if args.interfaces else None)
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
            scheme = "http" if cfg.insecure else "https"
            print(f"peer {peer.name} up at {peer.address} (key {peer.key_id})", flush=True)
            print(f"  page:  {scheme}://{peer.address}/   data: {cfg.data_dir}", flush=True)
            for s in peer._summaries.values():
                print(f"  publishes {s.id} {tuple(s.shape)} {' '.join('#' + t for t in s.tags)}",
                      flush=True)
            print(f"  join:  --join {peer.key_id}@{peer.address}", flush=True)
            await trio.sleep_forever()
    print("peer stopped", flush=True)
    return 0


async def _ephemeral(args):
    """A short-lived peer of the user's own, joined to the network (for one command).
    Plugin subcommands use it too: add the network options with ``add_network_options``."""
    from .network import connect

    name = getattr(args, "name", None) or _user()
    return connect(name, join=args.join, mdns=args.mdns, interfaces=args.interfaces,
                   insecure=args.insecure, data_dir=args.data_dir, wait=args.wait)


async def run_search(args) -> int:
    async with await _ephemeral(args) as net:
        hits = await net.search(args.query, wait=args.wait)
    if args.json:
        print(json.dumps({p: [ptr.meta for ptr in ptrs] for p, ptrs in hits.items()}, indent=2))
        return 0 if hits else 1
    if not hits:
        print(f"nothing matches {args.query!r}", file=sys.stderr)
        return 1
    print(f"{'PEER':<12} {'ID':<34} {'SHAPE':<14} {'DTYPE':<9} DESCRIPTION / TAGS")
    for peer, ptrs in sorted(hits.items()):
        for p in ptrs:
            print(f"{peer:<12} {p.id:<34} {str(tuple(p.shape)):<14} "
                  f"{str(p.dtype).removeprefix('torch.'):<9} {p.description}")
            print(f"{'':<72} {' '.join('#' + t for t in p.tags)}")
    return 0


async def run_peers(args) -> int:
    async with await _ephemeral(args) as net:
        await trio.sleep(min(args.wait, 1.0))
        d = net.me.directory
        recs = [r for r in d.peers() if r.key_id != net.me.key_id]
    rows = [{"name": d.label(r), "key_id": r.key_id, "addresses": r.addresses, "roles": r.roles,
             "objects": len(r.objects)} for r in recs]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<14} {r['key_id']}  {','.join(r['addresses']):<22} "
                  f"{','.join(r['roles']):<16} {r['objects']} object(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .owner_cli import fix_argv

    parser = build_parser()
    args = parser.parse_args(fix_argv(sys.argv[1:] if argv is None else list(argv)))
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose < 2:
        logging.getLogger("p2pgrid.hypercorn").setLevel(logging.ERROR)
    if args.command == "demo":
        from .demo import run_demo
        return trio.run(run_demo, args)
    runners = {"peer": run_peer, "search": run_search, "peers": run_peers, **parser.plugin_runners}
    runner = runners[args.command]
    try:
        return trio.run(runner, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
