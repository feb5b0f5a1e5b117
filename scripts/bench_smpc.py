#!/usr/bin/env python
"""SMPC benchmark over the network: two parties and the dealer as separate peer processes.

Starts three peer processes on 127.0.0.1 (``alice`` and ``bob`` hold the shares,
``dealer`` has the ``crypto-provider`` role), then, as a fourth peer (``client``)
in this process, measures with real TLS HTTP/2 between all of them:

- ``add_64x128`` (no round: what a session costs by itself), ``mul_64x784``,
  ``matmul_64x784_784x128``, ``relu_64x128``: ms per op, from the
  client's request to the reconstructed result (`reveal`), and the parties' own
  session time (first dealer fetch to last round);
- ``train_step_b64``: seconds per encrypted training step of the MLP 784-128-64-10
  (ReLU, MSE, SGD) on a shared batch of 64;
- ``inference_b64``: seconds per encrypted inference batch of 64 (the client shares
  its input, sent with the call, the parties run the model, only the client
  reconstructs; ``predict_only_s``: on a batch shared beforehand);
- rounds and payload bytes each party sends per op / step (measured on the wire's
  payloads by the parties themselves);
- ``round_ms``: what one more round costs, from a chain of 21 dependent 1x1 products
  against a single one;
- ``cpu_s_per_step``: CPU seconds (user + system) each process (alice, bob, dealer,
  client) spent per measured training step, and net of what it spends when idle
  (gossip, keepalives: ``idle_cpu_s_per_s``, measured over 3 s before the steps).
  CPU time survives a loaded machine far better than wall time. ``loop_cpu_s_per_step``:
  the part spent on each process's main thread (its trio loop: transport, handlers),
  the rest being worker threads (protocol compute, dealing, material expansion).

Medians over ``--reps`` after ``--warmup`` runs (the first run of a program plans it
and fetches its material; later runs get material the dealer made ahead of use).
With ``--security both`` a training step's ``active_vs_semi_honest`` compares medians,
means and CPU; means and CPU are steady-state figures only from ``--reps 42`` on (see
``STEADY_REPS``: a shorter window counts semi-honest dealing for steps it never runs).
One JSON object goes to stdout. For a clean loopback run it alone:

    unshare -rn sh -c 'ip link set lo up; .venv/bin/python scripts/bench_smpc.py'

With ``--lab ID`` (see scripts/bench_wan.py, which runs this inside a lab host) the
parties and the dealer run in the lab's hosts ``alice``, ``bob`` and ``dealer`` and
this process listens on its own host's LAN address; the training step then also
reports ``mean_s`` (mean over the measured steps, the dealer's work included) and
``wire_bytes_per_step`` (bytes each host sent on its link per step, TLS included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import trio  # noqa: E402
from torch import nn  # noqa: E402

import p2pgrid  # noqa: E402
from p2pgrid import smpc  # noqa: E402
from p2pgrid.config import PeerConfig  # noqa: E402
from p2pgrid.network import Network  # noqa: E402
from p2pgrid.smpc.messages import RunProgram, TrainStep  # noqa: E402
from p2pgrid.smpc.tensor import MasksAhead, output_masks, result_of, run_on_parties  # noqa: E402

PARTIES = ("alice", "bob")
CHAIN = 20
IDLE_S = 3.0   # seconds of idle CPU measured before the training steps
# A chain's first fetch deals up to LOOKAHEAD (16) semi-honest steps ahead, and from then
# on it keeps between half of that and all of it ahead: a window of n steps counts the
# dealing of up to n + 16 (for 784-128-64-10, 14 ahead: over 12 steps 1.6-2.2 times its
# dealing, from this many on a few percent of semi-honest's CPU).
STEADY_REPS = 42
DEALER = "dealer"


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ peer processes

async def _serve(args) -> None:
    torch.set_num_threads(args.threads)
    roles = ("crypto-provider",) if args.serve == DEALER else ()
    cfg = PeerConfig(name=args.serve, data_dir=Path(args.data_dir) / args.serve, mdns=False,
                     roles=roles, host=args.host or "127.0.0.1", join=tuple(args.join or ()), gossip_interval=1.0, ttl=60.0,
                     console=False)   # no owner console (nor its login token in the log)
    async with p2pgrid.open_peer(cfg) as peer:
        print(json.dumps({"key_id": peer.key_id, "address": peer.address}), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:   # exit cleanly, so that --profile can write its stats
                return


def _serve_main(args) -> None:
    if not args.profile:
        trio.run(_serve, args)
        return
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        trio.run(_serve, args)
    finally:
        prof.disable()
        prof.dump_stats(str(Path(args.profile) / f"{args.serve}.prof"))


def _spawn(name: str, data_dir: str, join: str | None, threads: int,
           lab: str | None = None, profile: str | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", name, "--data-dir", data_dir,
           "--threads", str(threads)]
    if profile:
        cmd += ["--profile", profile]
    if lab:
        from p2pgrid.lab import host_ns, ns_address
        ns = host_ns(lab, name)
        cmd = ["ip", "netns", "exec", ns, *cmd, "--host", ns_address(ns)]
    if join:
        cmd += ["--join", join]
    log = open(os.path.join(data_dir, f"{name}.log"), "w")   # a failing peer says why there
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    hello = json.loads(proc.stdout.readline())
    return proc, f"{hello['key_id']}@{hello['address']}"


# ------------------------------------------------------------------ measurements

def _median(xs):
    return statistics.median(xs) if xs else None


async def _timed_program(net: Network, expr: smpc.SharedTensor, reps: int, warmup: int,
                         chain: str = "") -> dict:
    program = expr.program()
    group = expr.group
    wall, party_s, stats = [], [], None
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        mask, rs = await output_masks(net, group, [expr.shape])     # active groups only
        replies = await run_on_parties(
            net, group, lambda s, nxt: RunProgram(s, group.to_wire(), program, [""], [True], nxt,
                                                  mask=mask),
            chain=chain)
        result_of(replies, 0, rs)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            party_s.append(max(r.values[0] for r in replies))
        stats = replies
    return {"ms": round(1000 * _median(wall), 2), "party_session_ms": round(1000 * _median(party_s), 2),
            "rounds": int(stats[0].values[1]),
            "bytes_sent_per_party": [int(r.values[2]) for r in stats],
            "dealer_bytes_per_party": _dealt(stats),
            "party_ms_split": _split(stats)}


def _dealt(replies) -> list[int]:
    """The bytes the dealer sent each party for the last run (seeds and corrections)."""
    return [int(r.values[7]) for r in replies]


def _split(replies) -> dict:
    """Where the parties' time went in the last run (ms, per party)."""
    keys = ("plan", "material", "compute", "wait")
    return {k: [round(1000 * r.values[3 + i], 1) for r in replies] for i, k in enumerate(keys)}


async def _measure(args, seed: str) -> dict:
    torch.set_num_threads(args.threads)
    cfg = PeerConfig(name="client", data_dir=Path(args.data_dir) / "client", mdns=False,
                     join=(seed,), gossip_interval=1.0, ttl=60.0, host=args.host or "127.0.0.1")
    async with p2pgrid.open_peer(cfg) as peer:
        net = Network(peer)
        await net.wait_for_peers([*PARTIES, DEALER], timeout=60)
        await trio.sleep(3.0)  # let every peer learn every other
        modes = ["semi-honest", "active"] if args.security == "both" else [args.security]
        out = {}
        for mode in modes:
            out[mode] = await _measure_mode(args, net, mode)
        return out if args.security == "both" else out[args.security]


async def _measure_mode(args, net: Network, security: str) -> dict:
    B, (d0, d1, d2, d3) = args.batch, [int(d) for d in args.mlp.split("-")]
    kw = dict(parties=PARTIES, dealer=DEALER, security=security)
    g = torch.Generator().manual_seed(0)
    x = await net.share(torch.randn(B, d0, generator=g), **kw)
    y = await net.share(torch.randn(B, d0, generator=g), **kw)
    w = await net.share(torch.randn(d0, d1, generator=g) * 0.05, **kw)
    h = await net.share(torch.randn(B, d1, generator=g), **kw)
    out = {}
    want = set(args.only.split(","))
    for name, expr in [(f"add_{B}x{d1}", h + h), (f"mul_{B}x{d0}", x * y),
                       (f"matmul_{B}x{d0}_{d0}x{d1}", x @ w), (f"relu_{B}x{d1}", h.relu())]:
        if "ops" in want or (name.startswith("relu") and "relu" in want):
            out[name] = await _timed_program(net, expr, args.reps, args.warmup, chain=name)
            _log(name, out[name])

    if "round" in want:
        # the cost of one round: a chain of 21 dependent 1x1 products against a single one
        one = await net.share(torch.ones(1), **kw)
        chain = one
        for _ in range(CHAIN):
            chain = chain * one
        single = await _timed_program(net, one * one, args.reps, args.warmup, chain="single")
        long = await _timed_program(net, chain, args.reps, args.warmup, chain="chain")
        out["round_ms"] = round((long["ms"] - single["ms"])
                                / (long["rounds"] - single["rounds"]), 3)
        _log("round", out["round_ms"], "ms")

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(d0, d1), nn.ReLU(), nn.Linear(d1, d2), nn.ReLU(),
                        nn.Linear(d2, d3))
    model = await net.encrypt_model(mlp, requires_grad=True, **kw)
    if "train" in want:
        out[f"train_step_b{B}"] = await _train(args, net, model, kw, g)
    if "inference" in want:
        out[f"inference_b{B}"] = await _inference(args, net, model, kw, g)
    return out


async def _train(args, net: Network, model, kw: dict, g) -> dict:
    """Encrypted training steps of the MLP on shared random data with one-hot targets:
    wall time, and each process's CPU time per step."""
    B, d0, d3 = args.batch, *[int(d) for d in args.mlp.split("-")][::3]
    xs = await net.share(torch.randn(4 * B, d0, generator=g), **kw)
    ys = await net.share(nn.functional.one_hot(torch.randint(0, d3, (4 * B,), generator=g),
                                               d3).float(), **kw)
    opt = smpc.SGD(model, lr=0.1)
    # what each process spends doing nothing in particular (gossip, keepalives), so that
    # the CPU per step can be read net of it
    idle0, t_idle = _cpu_now(args.pids), time.perf_counter()
    await trio.sleep(IDLE_S)
    idle1, t_idle = _cpu_now(args.pids), time.perf_counter() - t_idle
    times, party_s, last = [], [], None
    wire0 = cpu0 = None
    ahead = MasksAhead()   # as EncryptedModel.fit_batch: the next step's loss mask during this one
    for i in range(args.warmup + args.reps):
        if i == args.warmup:
            wire0 = _wire_bytes(args.lab)
            cpu0, loop0 = _cpu_now(args.pids), _cpu_now(args.pids, main_thread=True)
        rows = slice(B * (i % 4), B * (i % 4) + B)
        program = xs[rows].program([xs[rows], ys[rows]])
        t0 = time.perf_counter()
        mask, _ = await ahead.take(net, model.group, [[]])
        replies = await ahead.beside(net, model.group, [[]], lambda: run_on_parties(
            net, model.group, lambda s, nxt: TrainStep(s, model.group.to_wire(), model.id,
                                                       program, opt.lr, "mse", True, nxt,
                                                       mask=mask),
            chain="train"))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            party_s.append(max(r.values[0] for r in replies))
        last = replies
    cpu1, loop1 = _cpu_now(args.pids), _cpu_now(args.pids, main_thread=True)
    wire = _wire_bytes(args.lab)
    train = {
        "s": round(_median(times), 4), "mean_s": round(statistics.fmean(times), 4),
        "steps_s": [round(t, 4) for t in times],
        "party_session_s": round(_median(party_s), 4),
        "rounds": int(last[0].values[1]),
        "bytes_sent_per_party": [int(r.values[2]) for r in last],
        "dealer_bytes_per_party": _dealt(last),
        "party_ms_split": _split(last)}
    if wire:
        train["wire_bytes_per_step"] = {h: round((wire[h] - wire0[h]) / args.reps) for h in wire}
    train["cpu_s_per_step"], train["loop_cpu_s_per_step"] = (
        {k: round((end[k] - start[k]) / args.reps, 4) for k in end}
        for start, end in ((cpu0, cpu1), (loop0, loop1)))
    idle_rate = {k: (idle1[k] - idle0[k]) / t_idle for k in idle1}
    train["idle_cpu_s_per_s"] = {k: round(v, 4) for k, v in idle_rate.items()}
    mean = statistics.fmean(times)
    train["cpu_s_per_step_net_of_idle"] = {
        k: round(train["cpu_s_per_step"][k] - idle_rate[k] * mean, 4) for k in idle_rate}
    _log("train", train)
    return train


async def _inference(args, net: Network, model, kw: dict, g) -> dict:
    """Encrypted inference: the client shares a batch (with the call), the parties run the
    model, the client reconstructs; and the same on a batch shared beforehand."""
    B, d0 = args.batch, int(args.mlp.split("-")[0])
    model.requires_grad = False
    times, predict_only = [], []
    for i in range(args.warmup + args.reps):
        batch = torch.randn(B, d0, generator=g)
        t0 = time.perf_counter()
        await model.predict(batch)
        t1 = time.perf_counter()
        xb = await net.share(batch, **kw)
        t2 = time.perf_counter()
        await model.predict(xb)
        t3 = time.perf_counter()
        if i >= args.warmup:
            times.append(t1 - t0)
            predict_only.append(t3 - t2)
        await xb.delete()
    res = {"s": round(_median(times), 4), "mean_s": round(statistics.fmean(times), 4),
           "predict_only_s": round(_median(predict_only), 4)}
    _log("inference", res)
    return res


def _cpu_now(pids: dict[str, int], main_thread: bool = False) -> dict[str, float]:
    """CPU seconds (user + system) each benchmark process has used so far; with
    `main_thread`, its main thread's only (the trio loop: transport, handlers)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            out[name] = float("nan")
    out["client"] = time.thread_time() if main_thread else time.process_time()
    return out


def _wire_bytes(lab: str | None) -> dict[str, int] | None:
    """Bytes each lab host has sent on its link so far (None outside a lab)."""
    if not lab:
        return None
    from p2pgrid.lab import host_ns, ns_tx_bytes
    return {h: ns_tx_bytes(host_ns(lab, h)) for h in (*PARTIES, DEALER, "client")}


def _beaver_bound_bytes() -> int:
    """Per party per training step, opening each operand of each product once (64-bit)."""
    b, sizes = 64, [784, 128, 64, 10]
    total = 0
    for i in range(3):
        total += b * sizes[i] + sizes[i] * sizes[i + 1] + b * sizes[i + 1]  # x, W, grad
    return 8 * total


def _own_cores(pids: dict[str, int]) -> None:
    """Pin each party's threads to a CPU of its own and put the dealer's on SCHED_IDLE.
    Threads a process starts later inherit this from the thread that starts them (the
    peer's loop thread)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < len(PARTIES):
        raise SystemExit(f"--placement own-cores needs {len(PARTIES)} CPUs, this machine "
                         f"lets this process use {len(cpus)}")
    for name, pid in pids.items():
        for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
            if name == DEALER:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.sched_setaffinity(tid, {cpus[PARTIES.index(name)]})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--join", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--host", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--security", choices=["semi-honest", "active", "both"], default="semi-honest",
                    help="SMPC security mode; both: the same figures for each, on one run")
    ap.add_argument("--batch", type=int, default=64, help="batch rows (CI: a small size)")
    ap.add_argument("--mlp", default="784-128-64-10", help="layer widths of the MLP (4)")
    ap.add_argument("--only", default="ops,round,train,inference",
                    help="what to measure, comma-separated among ops, relu, round, train, inference")
    ap.add_argument("--profile", default=None,
                    help="folder: run the party and dealer processes under cProfile, stats there")
    ap.add_argument("--lab", default=None,
                    help="lab id: run the parties in its hosts alice, bob, dealer (scripts/bench_wan.py)")
    ap.add_argument("--placement", choices=["shared", "own-cores"], default="shared",
                    help="shared: every process on every CPU (default); own-cores: each party "
                         "pinned to a CPU of its own and the dealer on idle CPU time only "
                         "(SCHED_IDLE), a stand-in for every peer on a machine of its own")
    args = ap.parse_args(argv)
    if args.serve:
        _serve_main(args)
        return
    own_root = args.data_dir is None   # ours to remove: in /dev/shm it holds memory
    root = args.data_dir or tempfile.mkdtemp(prefix="bench-smpc-",
                                             dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args.data_dir = root
    procs = []
    try:
        if args.lab and not args.host:
            from p2pgrid.lab import host_ns, ns_address
            args.host = ns_address(host_ns(args.lab, "client"))
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
        first, seed = _spawn(PARTIES[0], root, None, args.threads, args.lab, args.profile)
        procs.append(first)
        for name in (PARTIES[1], DEALER):
            p, _ = _spawn(name, root, seed, args.threads, args.lab, args.profile)
            procs.append(p)
        args.pids = {name: p.pid for name, p in zip((*PARTIES, DEALER), procs)}
        if args.placement == "own-cores":
            _own_cores(args.pids)
        t0 = time.perf_counter()
        ops = trio.run(_measure, args, seed)
        result = {
            "setting": {"parties": list(PARTIES), "dealer": DEALER, "processes": 4,
                        "transport": "TLS HTTP/2 (rounds pushed on streams), "
                        + (f"lab {args.lab} (separate namespaces)" if args.lab else "loopback"), "frac_bits": 16,
                        "torch_threads": args.threads, "reps": args.reps,
                        "placement": args.placement,
                        "cpus": os.cpu_count()},
            **ops,
            "beaver_bound_bytes_per_party_step": _beaver_bound_bytes(),
            "targets": {"train_step_s": 0.10, "inference_b64_s": 0.05, "relu_ms": 15,
                        "bytes_vs_beaver_bound": 1.5},
            "elapsed_s": round(time.perf_counter() - t0, 1),
        }
        if args.security == "both" and "train" in args.only.split(","):
            sh, ac = result["semi-honest"], result["active"]
            train = f"train_step_b{args.batch}"
            result["active_vs_semi_honest"] = {
                "train_step_s": round(ac[train]["s"] / sh[train]["s"], 2),
                # semi-honest steps come in bursts (material for many steps in one fetch,
                # outside most steps' times): medians flatter it, means count the bursts,
                # but a short window counts the first fetch's, for up to LOOKAHEAD steps
                # it never runs, and so flatters active (see STEADY_REPS)
                "train_step_mean_s": round(ac[train]["mean_s"] / sh[train]["mean_s"], 2),
                "train_cpu": round(sum(ac[train]["cpu_s_per_step"].values())
                                   / sum(sh[train]["cpu_s_per_step"].values()), 2),
                "train_bytes": round(max(ac[train]["bytes_sent_per_party"])
                                     / max(sh[train]["bytes_sent_per_party"]), 2),
                "train_dealer_bytes": round(sum(ac[train]["dealer_bytes_per_party"])
                                            / sum(sh[train]["dealer_bytes_per_party"]), 2),
                "train_extra_rounds": ac[train]["rounds"] - sh[train]["rounds"]}
            if args.reps < STEADY_REPS:
                result["active_vs_semi_honest"]["note"] = (
                    f"means and CPU over {args.reps} steps include semi-honest dealing for "
                    f"steps beyond them; --reps {STEADY_REPS} or more for the steady state")
        elif args.batch == 64 and args.mlp == "784-128-64-10" and "train_step_b64" in result:
            tb = result["train_step_b64"]["bytes_sent_per_party"]
            result["train_bytes_vs_beaver_bound"] = round(max(tb) / result[
                "beaver_bound_bytes_per_party_step"], 3)
        print(json.dumps(result, indent=1))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
