#!/usr/bin/env python
"""WAN benchmark: SMPC, FedAvg and search between hosts on a lab LAN with added delay.

For each one-way delay (default 0, 10, 20, 50 ms; RTT = 2 x delay) this builds a lab
(p2pgrid.lab: one network namespace per host, every link delayed) and runs, each in
its own lab so that one measurement's peers do not load the next:

* SMPC (scripts/bench_smpc.py --lab): parties ``alice`` and ``bob``, the ``dealer``
  (crypto provider) and the ``client`` on four hosts: the training step of the MLP
  784-128-64-10 on a batch of 64 (``mean_s`` over ``--reps`` steps after ``--warmup``,
  dealing included; ``rounds``; payload bytes each party sent; bytes each host sent on
  its link per step, the dealer's among them), encrypted inference per 64 images, ReLU
  64x128, and what one more round costs (``round_ms``);
* search: a fresh scientist peer on ``client`` finds the hospital's records by tag over
  mDNS and gossip (``search_s``: from starting the peer to the first hit);
* FedAvg (scripts/bench_fedavg.py --lab): rounds of the same MLP over MNIST shards with
  3 (``--fedavg-peers 3,10``: and 10) data peers each on its own host; median round
  wall time and its overhead beyond local training.

Next to each latency it prints ``rounds x RTT`` and ``rounds x delay``: in an SPDZ round
both parties send at once and each waits for the other's message, so a round costs one
one-way delay, not a round trip (``round_ms`` measures it); the call that starts a step
and its reply add one RTT. Needs root (scripts/lab.py). One JSON object to
stdout; progress to stderr::

    sudo .venv/bin/python scripts/bench_wan.py --delays 0,20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p2pgrid import lab as labmod  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"

SEARCH = textwrap.dedent("""
    import json, os, time, trio, p2pgrid

    async def main():
        t0 = time.perf_counter()
        async with p2pgrid.connect("scientist", host=os.environ["LISTEN"], wait=0) as net:
            hits = await net.search("#february #birth-records", wait=60)
            t1 = time.perf_counter()
            assert hits.get("hospital"), "no hit"
        print(json.dumps({"search_s": round(t1 - t0, 3)}), flush=True)

    trio.run(main)
""")


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def _last_json(text: str) -> dict:
    """The JSON object a benchmark script printed last (it may span lines)."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.startswith("{") else start + 1
    return json.loads(text[start:])


def _emulator() -> str:
    # one link kind for every delay, so that the 0 ms row is the baseline of the others
    return "veth" if labmod.has_netem() else "vde"


def _sysctls(args) -> dict[str, str]:
    # Linux restarts a connection's congestion window at 10 segments after an idle RTO:
    # a FedAvg update (436 KB) then needs about 5 round trips each way whatever the
    # bandwidth. Hosts that keep long-lived connections usually turn that off.
    return {"net.ipv4.tcp_slow_start_after_idle": "0"} if args.no_slow_start_after_idle else {}


def smpc(delay_ms: float, args) -> dict:
    spec = labmod.LinkSpec(delay_ms=delay_ms)
    with labmod.Lab(["client", "alice", "bob", "dealer"], spec, emulator=_emulator(),
                    sysctls=_sysctls(args)) as lab:
        r = lab.run("client", ["python", str(SCRIPTS / "bench_smpc.py"), "--lab", lab.id,
                               "--reps", str(args.reps), "--warmup", str(args.warmup),
                               "--only", args.smpc],
                    timeout=args.timeout, env={"OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            raise labmod.LabError(f"bench_smpc failed: {r.stderr[-3000:]}")
        out = _last_json(r.stdout)
        search = {}
        if not args.no_search:
            # search: the hospital (its profile) on alice's host, a fresh scientist on the client's
            lab.start_peer("alice", name="hospital", profile=REPO / "peers" / "hospital.toml",
                           args=["--host", lab.address("alice")])
            s = lab.run("client", ["python", "-c", SEARCH], timeout=180,
                        env={"LISTEN": lab.address("client")})
            search = _last_json(s.stdout) if s.returncode == 0 else {"error": s.stderr[-500:]}
    rtt = 2 * delay_ms / 1000
    row: dict = {}
    if "train_step_b64" in out:
        train = out["train_step_b64"]
        wire = train.get("wire_bytes_per_step", {})
        row["train_step_b64"] = {
            "mean_s": train.get("mean_s"), "median_s": train["s"], "rounds": train["rounds"],
            "rounds_x_rtt_s": round(train["rounds"] * rtt, 3),
            "rounds_x_delay_s": round(train["rounds"] * delay_ms / 1000, 3),
            "cpu_s_per_step": train.get("cpu_s_per_step"),
            "party_ms_split": train.get("party_ms_split"),
            "payload_bytes_per_party": train["bytes_sent_per_party"],
            "wire_bytes_per_step": wire, "dealer_wire_bytes_per_step": wire.get("dealer")}
    if "inference_b64" in out:
        inf = out["inference_b64"]
        row["inference_b64"] = {"mean_s": inf.get("mean_s"), "median_s": inf["s"],
                                "predict_only_s": inf["predict_only_s"]}
    if "relu_64x128" in out:
        relu = out["relu_64x128"]
        row["relu_64x128"] = {"ms": relu["ms"], "rounds": relu["rounds"],
                              "rounds_x_rtt_ms": round(relu["rounds"] * rtt * 1000, 1),
                              "bytes_sent_per_party": relu["bytes_sent_per_party"]}
    if "round_ms" in out:
        row["round_ms"] = out["round_ms"]
    return {**row, **search, "smpc_raw": out}


def fedavg(delay_ms: float, peers: int, args) -> dict:
    spec = labmod.LinkSpec(delay_ms=delay_ms)
    hosts = ["ai"] + [f"peer{i:02d}" for i in range(peers)]
    with labmod.Lab(hosts, spec, emulator=_emulator(), sysctls=_sysctls(args)) as lab:
        r = lab.run("ai", ["python", str(SCRIPTS / "bench_fedavg.py"), "--lab", lab.id,
                           "--peers", str(peers), "--rounds", str(args.rounds),
                           "--data", str(args.data)], timeout=args.timeout)
        if r.returncode != 0:
            raise labmod.LabError(f"bench_fedavg failed: {r.stderr[-3000:]}")
        res = _last_json(r.stdout)["results"][0]
    return {"peers": peers, "median_wall_s": res["median_wall_s"],
            "median_compute_s": res["median_compute_s"], "median_overhead_s": res["median_overhead_s"],
            "median_outside_peers_s": res["median_outside_peers_s"],
            "overhead_in_rtts": (round(res["median_overhead_s"] / (2 * delay_ms / 1000), 1)
                                 if delay_ms else None),
            "median_bytes": res["median_bytes"], "median_exchanges": res.get("median_exchanges"),
            "rounds": res["rounds"]}


def _beyond_baseline(rows: list[dict]) -> None:
    """FedAvg overhead a delay adds to the 0 ms row's, in RTTs (the target: <= 3)."""
    base = next((r for r in rows if r["delay_ms"] == 0), None)
    if base is None:
        return
    for row in rows:
        if row["delay_ms"] == 0:
            continue
        for fl in row.get("fedavg", []):
            ref = next((b for b in base.get("fedavg", []) if b["peers"] == fl["peers"]), None)
            if ref is not None:
                fl["overhead_beyond_0ms_in_rtts"] = round(
                    (fl["median_overhead_s"] - ref["median_overhead_s"]) / (row["rtt_ms"] / 1000), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delays", default="0,10,20,50", help="one-way delays in ms (default 0,10,20,50)")
    ap.add_argument("--reps", type=int, default=20, help="measured SMPC steps/ops per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="FedAvg rounds (the first is left out)")
    ap.add_argument("--fedavg-peers", default="3", help="FedAvg peer counts, e.g. 3,10 (0: skip)")
    ap.add_argument("--skip-smpc", action="store_true")
    ap.add_argument("--smpc", default="ops,round,train,inference",
                    help="SMPC measurements (bench_smpc.py --only), e.g. train")
    ap.add_argument("--smpc-delays", default=None,
                    help="run SMPC only at these of the delays (default: all), e.g. 20")
    ap.add_argument("--no-search", action="store_true", help="skip the search latency")
    ap.add_argument("--no-slow-start-after-idle", action="store_true",
                    help="set net.ipv4.tcp_slow_start_after_idle=0 on every lab host")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                    help="folder holding mnist/ for FedAvg")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark run")
    args = ap.parse_args(argv)
    reason = labmod.unsupported_reason() or (None if labmod.has_netem() else labmod.vde_missing())
    if reason:
        print(f"bench_wan: {reason}", file=sys.stderr)
        return 2
    delays = [float(d) for d in args.delays.split(",")]
    if args.smpc_delays is not None:
        args.smpc_delays = {float(d) for d in args.smpc_delays.split(",")}
    fl_peers = [int(p) for p in args.fedavg_peers.split(",") if int(p) > 0]
    if fl_peers and not (args.data / "mnist").is_dir():
        print(f"bench_wan: no MNIST under {args.data} (--data); FedAvg skipped", file=sys.stderr)
        fl_peers = []
    out = {"benchmark": "wan", "emulator": _emulator(), "cpus": os.cpu_count(),
           "setting": {"tcp_slow_start_after_idle": 0 if args.no_slow_start_after_idle else 1,
                       "reps": args.reps, "warmup": args.warmup, "fedavg_rounds": args.rounds,
                       "delay": "one-way, on every host's link (RTT = 2 x delay)"},
           "results": []}
    t0 = time.perf_counter()
    for d in delays:
        row: dict = {"delay_ms": d, "rtt_ms": 2 * d}
        if not args.skip_smpc and (args.smpc_delays is None or d in args.smpc_delays):
            _log(f"== {d:g} ms: SMPC")
            row["smpc"] = smpc(d, args)
            _log(json.dumps({k: v for k, v in row["smpc"].items() if k != "smpc_raw"}))
        for n in fl_peers:
            _log(f"== {d:g} ms: FedAvg, {n} peers")
            row.setdefault("fedavg", []).append(fedavg(d, n, args))
            _log(json.dumps(row["fedavg"][-1]))
        out["results"].append(row)
    _beyond_baseline(out["results"])
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
