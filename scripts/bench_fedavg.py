"""FedAvg round costs with peers as separate processes: wall time, local compute, overhead, bytes.

For each peer count (default 3 and 10) this starts that many data peers as OS
processes (``scripts/fl_mnist.py worker``), each holding a disjoint shard of the
first 8,000 MNIST images, and runs FedAvg rounds of the 784-128-64-10 MLP from
this process, without evaluation. Per round it reports

* ``wall_s``: the round as the coordinator saw it (probe, send, train, receive, aggregate);
* ``compute_s``: the slowest peer's pure local training time (inside the training loop);
* ``overhead_s``: the difference: everything federated learning adds to local training;
  split into ``peer_s`` (the slowest peer's whole request: decode, rebuild the model, load
  its data, train, reply) and ``outside_peers_s`` (= wall - peer_s: transfer and the
  coordinator's own work; ``coordinator_cpu_s`` is the latter's CPU time);
* ``exchanges``: request/response exchanges on the round's critical path (``requests``:
  how many of each phase: probe, fit, evaluate...; one phase's requests go out at once);
* ``bytes``: encoded messages the coordinator sent and received, against
  ``2 x model size x peers`` (the model out to each peer, an update back);
* ``lo_bytes``: bytes that crossed the loopback interface during the round (TLS,
  HTTP/2 framing and gossip included), when /proc/net/dev is readable.

The first round of each configuration is reported but left out of the medians
(connections are opened then). Run it alone on the machine, ideally in its own
network namespace so that ``lo_bytes`` counts only this benchmark::

    unshare -n sh -c 'ip link set lo up; .venv/bin/python scripts/bench_fedavg.py'

With ``--lab ID`` (scripts/bench_wan.py runs it so) this process runs in the lab host
``ai`` and each data peer in the lab host of its name (``peer00``, ``peer01``...), all
listening on their LAN addresses.

Prints JSON.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fl_mnist import DEFAULT_DATA, Workers, mlp, run_script, wait_for_data  # noqa: E402


def lo_bytes() -> int | None:
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])  # transmitted bytes (on loopback, = received)
    except (OSError, ValueError, IndexError):
        return None
    return None


async def bench(n_peers: int, args) -> dict:
    import p2pgrid
    from p2pgrid.federated import SGD, FedAvg

    names = [f"peer{i:02d}" for i in range(n_peers)]
    wrap, host = None, "127.0.0.1"
    if args.lab:
        from p2pgrid.lab import host_ns, ns_address
        host = ns_address(host_ns(args.lab, "ai"))

        def wrap(name, cmd):
            ns = host_ns(args.lab, name)
            return ["ip", "netns", "exec", ns, *cmd, "--host", ns_address(ns)]
    workers = Workers(Path(__file__).resolve().parent / "fl_mnist.py", wrap=wrap)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fedavg-"))
    marks: dict[int, int | None] = {}
    cpu: dict[int, float] = {}

    # in a lab the traffic is on each host's link, not on this host's loopback
    counter = (lambda: None) if args.lab else lo_bytes

    phases: dict[int, dict[str, int]] = {}

    def on_event(ev):
        if ev.kind in ("reply", "failure"):   # one per request the coordinator sent
            ph = phases.setdefault(ev.round, {})
            ph[ev.info.get("phase", "?")] = ph.get(ev.info.get("phase", "?"), 0) + 1
        if ev.kind == "round_start":
            marks[ev.round] = counter()
            cpu[ev.round] = time.process_time()
        elif ev.kind == "round_end":
            start, end = marks.get(ev.round), counter()
            marks[ev.round] = None if start is None or end is None else end - start
            cpu[ev.round] = time.process_time() - cpu[ev.round]

    t0 = time.perf_counter()
    async with p2pgrid.connect("ai", mdns=False, data_dir=tmp / "ai", wait=0, host=host,
                               gossip_interval=1.0) as net, trio.open_nursery() as nursery:
        join = f"{net.me.key_id}@{net.me.address}"
        for i, name in enumerate(names):
            await workers.start(nursery, name, [
                "--data", str(args.data), "--shard", str(i), "--shards", str(n_peers),
                "--dir", str(tmp / name), "--join", join])
        try:
            await workers.wait_ready(timeout=600)
            await wait_for_data(net, "#mnist #train", names, timeout=120)
            startup = time.perf_counter() - t0
            model = mlp(0)
            result = await net.federated_fit(
                model, "#mnist #train", rounds=args.rounds, local_epochs=1, batch_size=32,
                optimizer=SGD(lr=0.02, momentum=0.9),
                strategy=FedAvg(min_peers=n_peers, round_timeout=600),
                secure_aggregation=args.secure, progress=False, on_event=on_event)
        finally:
            await workers.close()
            nursery.cancel_scope.cancel()
    shutil.rmtree(tmp, ignore_errors=True)
    model_bytes = sum(t.numel() * t.element_size() for t in result.params.values())
    expected = 2 * model_bytes * n_peers
    rounds = []
    for h in result.history:
        rounds.append({"round": h.round, "peers": len(h.peers), "wall_s": round(h.seconds, 4),
                       "compute_s": round(h.train_seconds or 0.0, 4),
                       "overhead_s": round(h.seconds - (h.train_seconds or 0.0), 4),
                       "peer_s": round(h.peer_seconds or 0.0, 4),
                       "outside_peers_s": round(h.seconds - (h.peer_seconds or 0.0), 4),
                       "coordinator_cpu_s": round(cpu.get(h.round, 0.0), 4),
                       "bytes": h.bytes, "bytes_vs_2x_model_x_peers": round(h.bytes / expected, 4),
                       "lo_bytes": marks.get(h.round),
                       # request/response exchanges on the critical path: the requests of one
                       # phase go to every peer at once, the phases one after another
                       "requests": phases.get(h.round, {}),
                       "exchanges": len(phases.get(h.round, {}))})
    steady = rounds[1:] or rounds

    def median(key):
        values = [r[key] for r in steady if r[key] is not None]
        return round(statistics.median(values), 4) if values else None

    return {"peers": n_peers, "processes": n_peers + 1, "secure_aggregation": args.secure,
            "examples_per_peer": 8000 // n_peers, "model_params": model_bytes // 4,
            "model_bytes": model_bytes, "two_x_model_x_peers": expected,
            "startup_s": round(startup, 2), "median_wall_s": median("wall_s"),
            "median_compute_s": median("compute_s"), "median_overhead_s": median("overhead_s"),
            "median_peer_s": median("peer_s"), "median_outside_peers_s": median("outside_peers_s"),
            "median_coordinator_cpu_s": median("coordinator_cpu_s"),
            "median_bytes": median("bytes"), "median_lo_bytes": median("lo_bytes"),
            "median_bytes_vs_2x_model_x_peers": median("bytes_vs_2x_model_x_peers"),
            "median_exchanges": median("exchanges"),
            "rounds": rounds}


async def main_async(args) -> dict:
    torch.set_num_threads(1)
    out = {"benchmark": "fedavg", "model": "MLP 784-128-64-10, float32", "rounds": args.rounds,
           "local_epochs": 1, "batch_size": 32, "cpus": __import__("os").cpu_count(),
           "network_namespace": Path("/proc/net/dev").exists() and _alone(), "results": []}
    for n in args.peers:
        out["results"].append(await bench(n, args))
    return out


def _alone() -> bool:
    """True when loopback is the only interface (as in `unshare -n`)."""
    try:
        names = [line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
        return names == ["lo"]
    except OSError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="3,10", help="peer counts (default 3,10)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--secure", action="store_true", help="with secure aggregation")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, help="also write the JSON here")
    p.add_argument("--lab", help="lab id: run in its hosts ai, peer00, peer01... (scripts/bench_wan.py)")
    args = p.parse_args(argv)
    args.peers = [int(x) for x in args.peers.split(",")]
    return run_script(args, main_async)


if __name__ == "__main__":
    sys.exit(main())
