#!/usr/bin/env python
"""Start a lab network: one Linux network namespace per host on an emulated LAN, a
``p2pgrid peer`` in each, until Ctrl-C; then everything is torn down.

    sudo .venv/bin/python scripts/lab.py --hosts hospital,clinic,bob --delay 20ms
    sudo ip netns exec p2plab-lan-bob .venv/bin/p2pgrid search '#birth-records' --as bob

A host named like a profile in peers/ runs ``p2pgrid peer --profile peers/NAME.toml``;
others run a bare peer (``--no-peer HOST`` leaves a host empty, e.g. for a scientist).
Link options apply to every host's link (one-way: a packet between two hosts is delayed
once). See p2pgrid/lab.py for the topology; needs root.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p2pgrid import lab as labmod  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", default="hospital,clinic,university,company",
                    help="comma-separated host names (default: hospital,clinic,university,company)")
    ap.add_argument("--delay", help="one-way delay added on each host's link, e.g. 20ms")
    ap.add_argument("--jitter", help="delay variation, e.g. 2ms (with --delay)")
    ap.add_argument("--loss", help="packet loss on each host's link, e.g. 0.1%%")
    ap.add_argument("--rate", help="each host's link rate, e.g. 100mbit, 1gbit")
    ap.add_argument("--id", default="lan", help="lab id: namespaces are p2plab-ID-HOST (default lan)")
    ap.add_argument("--emulator", choices=("auto", "veth", "vde"), default="auto",
                    help="auto: netem on veth where the kernel has it, else vde wirefilter")
    ap.add_argument("--no-peer", action="append", default=[], metavar="HOST",
                    help="start no peer on this host (repeatable)")
    ap.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for every `p2pgrid peer` (repeatable), e.g. --peer-arg=--ttl=6")
    ap.add_argument("--bind-lan", action=argparse.BooleanOptionalAction, default=True,
                    help="pass --host <the host's LAN address> to each peer (default on)")
    ap.add_argument("--clean", action="store_true", help="only remove labs left by interrupted runs")
    args = ap.parse_args(argv)

    reason = labmod.unsupported_reason()
    if reason:
        print(f"lab: {reason}", file=sys.stderr)
        return 2
    if args.clean:
        gone = labmod.cleanup_stale()
        print(f"removed {len(gone)} stale lab(s)" + (f": {', '.join(gone)}" if gone else ""))
        return 0
    try:
        spec = labmod.LinkSpec.parse(args.delay, args.jitter, args.loss, args.rate)
        lab = labmod.Lab([h.strip() for h in args.hosts.split(",") if h.strip()], spec,
                         lab_id=args.id, emulator=args.emulator)
    except ValueError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2

    def _term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)
    signal.signal(signal.SIGINT, _term)  # also when started in the background (SIGINT ignored)
    try:
        lab.start()
        print(f"lab {lab.id}: {len(lab.hosts)} hosts on {lab.subnet}.0/24 ({lab.kind} links, "
              f"{spec.describe()})", flush=True)
        specs = {}
        for name in lab.hosts:
            if name in args.no_peer:
                continue
            peer_args = (["--host", lab.address(name)] if args.bind_lan else []) + args.peer_arg
            profile = REPO / "peers" / f"{name}.toml"
            specs[name] = dict(profile=profile if profile.exists() else None, args=peer_args)
        peers = lab.start_peers(specs)
        for name, h in lab.hosts.items():
            p = peers.get(name)
            what = f"peer {p.name} at {p.address} (key {p.key_id})" if p else "no peer"
            print(f"  {name:<12} {h.address:<12} ip netns exec {h.ns} bash    # {what}", flush=True)
        print(f"peer logs: {lab.dir}/logs   Ctrl-C stops the lab and removes it", flush=True)
        while True:
            for name, p in peers.items():
                if p.proc.poll() is not None:
                    print(f"lab: peer on {name} exited {p.proc.returncode}; see {p.log}", file=sys.stderr)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    except labmod.LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    finally:
        print("lab: tearing down", file=sys.stderr, flush=True)
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
