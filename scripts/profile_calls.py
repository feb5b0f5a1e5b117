"""Function calls per small call, server and client: the figure that survives a loaded machine.

    unshare -n sh -c 'ip link set lo up; python scripts/profile_calls.py --pings 1000'

Starts a server peer in a child process and a client peer here (as
``bench_transport.py`` does), warms up, then profiles only the timed
``peer.request(server, Ping())`` loop in both processes with cProfile. Prints one
JSON object: Python function calls per round trip on each side (deterministic: the
same code path gives the same count whatever the load), CPU per round trip
(process time, all threads; needs a quiet machine to mean much), the background CPU
of both peers while idle, and where the pstats went (``--out``). Run it in two
checkouts to compare them (from each one's root: it uses that checkout's
``scripts/bench_transport.py``, e.g. ``cd OLD && PYTHONPATH=$PWD python
NEW/scripts/profile_calls.py``); ``--gossip`` sets both peers' gossip interval (60 keeps
gossip out of the counts; bench_transport uses 0.2).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

# the bench of the checkout being measured (run from its root), else this one's
sys.path[:0] = [str(Path(__file__).resolve().parent), os.path.join(os.getcwd(), "scripts")][::-1]
import bench_transport as bt  # noqa: E402 - the bench's server, settle and CPU helpers

from p2pgrid.messages import Ping  # noqa: E402


def _serve(args) -> None:
    prof = cProfile.Profile()
    out = Path(args.out)

    def on(*_):
        prof.enable()

    def off(*_):
        prof.disable()
        out.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(out / "server.pstats"))
    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    config = bt.PeerConfig
    bt.PeerConfig = lambda **kw: config(**{**kw, "gossip_interval": args.gossip})
    trio.run(bt._serve, argparse.Namespace(data_dir=args.data_dir, insecure=False))


async def _client(args, seed: str, data_dir: Path, pid: int) -> dict:
    import p2pgrid
    cfg = bt.PeerConfig(name="bench-client", data_dir=data_dir, mdns=False, join=(seed,),
                        gossip_interval=args.gossip, ttl=max(30.0, 5 * args.gossip))
    async with p2pgrid.open_peer(cfg) as peer:
        await bt._wait_known(peer, "bench-server")
        await bt._settle(pid)
        for _ in range(200):
            await peer.request("bench-server", Ping())
        i0 = bt._cpu_s(), bt._cpu_s(pid), time.perf_counter()
        await trio.sleep(3)
        i1 = bt._cpu_s(), bt._cpu_s(pid), time.perf_counter()
        prof = cProfile.Profile()
        os.kill(pid, signal.SIGUSR1)
        await trio.sleep(0.2)
        c0 = bt._cpu_s(), bt._cpu_s(pid), time.perf_counter()
        prof.enable()
        for _ in range(args.pings):
            await peer.request("bench-server", Ping())
        prof.disable()
        c1 = bt._cpu_s(), bt._cpu_s(pid), time.perf_counter()
        os.kill(pid, signal.SIGUSR2)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(Path(args.out) / "client.pstats"))
        await trio.sleep(1.0)   # the server writes its stats
    n = args.pings

    def calls(side):
        return round(sum(v[1] for v in pstats.Stats(str(Path(args.out) / f"{side}.pstats")).stats.values()) / n)
    return {"pings": n, "calls_per_ping": {"client": calls("client"), "server": calls("server")},
            "cpu_ms_per_ping_profiled": {"client": round((c1[0] - c0[0]) * 1e3 / n, 3),
                                         "server": round((c1[1] - c0[1]) * 1e3 / n, 3)},
            "idle_cpu_ms_per_s": {"client": round((i1[0] - i0[0]) * 1e3 / (i1[2] - i0[2]), 2),
                                  "server": round((i1[1] - i0[1]) * 1e3 / (i1[2] - i0[2]), 2)},
            "pstats": args.out, "load": os.getloadavg()[0]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pings", type=int, default=1000, help="profiled Ping round trips")
    ap.add_argument("--gossip", type=float, default=60.0, help="gossip interval of both peers")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "p2pgrid-profile-calls"),
                    help="where the pstats go")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = os.path.abspath(args.out)
    if args.serve:
        _serve(args)
        return
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="p2pgrid-calls-", dir=base) as root:
        server_dir, client_dir = Path(root, "s"), Path(root, "c")
        server_dir.mkdir()
        client_dir.mkdir()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve",
                                 "--data-dir", str(server_dir), "--gossip", str(args.gossip),
                                 "--out", args.out], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            hello = json.loads(proc.stdout.readline())
            res = trio.run(_client, args, f"{hello['key_id']}@{hello['address']}", client_dir,
                           proc.pid)
        finally:
            proc.stdin.close()
            proc.wait(30)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
