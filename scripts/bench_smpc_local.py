#!/usr/bin/env python
"""Local SMPC benchmark: in-process harness, no network. Prints one JSON object.

For each op (2 parties by default): online ms (dealer material prefetched and
expanded beforehand, as a batched offline phase would), offline ms (dealing +
seed expansion for the op), end-to-end ms (dealing on demand), rounds, payload bytes
sent per party, and bytes each party received from the dealer. Times are medians over
--reps runs and cover *all* parties, which run one after another in this process
(a party's own share of the work is about 1/n of it); no network latency is included.

    .venv/bin/python scripts/bench_smpc_local.py [--parties 2] [--reps 5] [--threads 1]
    .venv/bin/python scripts/bench_smpc_local.py --security both [--batch 8] [--mlp 784-128-64-10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from p2pgrid.protocols.smpc import (DealerFeed, LocalDealer, SmpcConfig, matmul, mul, relu,  # noqa: E402
                            run_parties)
from p2pgrid.protocols.smpc.testing import share_inputs  # noqa: E402


def _party_fn(op, shares):
    return lambda ctx: op(ctx, *[ctx.wrap(s[ctx.party]) for s in shares])


def bench(op, inputs, n: int, reps: int, config: SmpcConfig) -> dict:
    shares = share_inputs(n, inputs, frac_bits=config.frac_bits, seed=0)
    fn = _party_fn(op, shares)
    dry = DealerFeed(LocalDealer(), n)                 # records the op's dealer requests
    stats = run_parties(n, fn, feed=dry, config=config, seed=0).stats
    online, offline, e2e = [], [], []
    for _ in range(reps):
        feed = DealerFeed(LocalDealer(), n)
        t0 = time.perf_counter()
        feed.prefetch(dry.log, expand=True)
        t1 = time.perf_counter()
        run_parties(n, fn, feed=feed, config=config, seed=0)
        t2 = time.perf_counter()
        run_parties(n, fn, config=config, seed=0)
        t3 = time.perf_counter()
        offline.append(t1 - t0)
        online.append(t2 - t1)
        e2e.append(t3 - t2)
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    return {"online_ms": ms(online), "offline_ms": ms(offline), "end_to_end_ms": ms(e2e),
            "rounds": stats.rounds, "bytes_sent_per_party": stats.bytes_sent,
            "messages_sent_per_party": stats.messages_sent,
            "dealer_bytes_per_party": stats.dealer_bytes}


def bench_security(args) -> dict:
    """Both modes on one run: one training step of an MLP (forward, MSE, backward, SGD, the
    loss revealed), an inference of the same MLP (as encrypted models run them over the
    network: p2pgrid.smpc) and a ReLU (the in-memory ops of p2pgrid.protocols.smpc.modes).

    Process CPU time (all parties run in this process, dealing included: it survives a
    loaded machine), rounds, bytes each party sends and the dealer's bytes to each party
    (seed-compressed, as the network dealer sends them)."""
    from p2pgrid.protocols.smpc import autograd, mac, mac_program
    from p2pgrid.protocols.smpc.mac_material import MaterialDealer
    from p2pgrid.protocols.smpc.modes import run_program
    from p2pgrid.protocols.smpc.runtime import input_shares
    from p2pgrid.protocols.smpc.runtime import reveal as sh_reveal
    g = torch.Generator().manual_seed(0)
    dims = [int(d) for d in args.mlp.split("-")]
    x = torch.randn(args.batch, dims[0], generator=g)
    y = torch.randn(args.batch, dims[-1], generator=g)
    ws = [torch.randn(a, b, generator=g) * 0.1 for a, b in zip(dims, dims[1:])]
    bs = [torch.randn(b, generator=g) * 0.1 for b in dims[1:]]
    h = torch.randn(args.batch, dims[1], generator=g)
    layers = []
    for i in range(len(ws)):
        layers.append({"kind": "linear", "weight": f"w{i}", "bias": f"b{i}"})
        if i < len(ws) - 1:
            layers.append({"kind": "relu"})

    def relu_only(ops):
        v = yield from ops.input(0, h if ops.party == 0 else None, h.shape)
        return (yield from ops.reveal((yield from ops.relu(v))))

    def train_semi_honest(ctx):
        def inp(owner, t):
            return input_shares(ctx, owner, t if ctx.party == owner else None, t.shape)
        xs, ys = (yield from inp(0, x)), (yield from inp(0, y))
        params = {}
        for i, (w, b) in enumerate(zip(ws, bs)):
            params[f"w{i}"], params[f"b{i}"] = (yield from inp(1, w)), (yield from inp(1, b))
        net = autograd.build(layers, params)
        loss = yield from autograd.train_step(ctx, net, xs, ys, 0.1)
        return (yield from sh_reveal(ctx, loss))

    def train_active(ctx):
        def inp(owner, t):
            return mac.input_value(ctx, owner, t if ctx.party == owner else None, t.shape)
        xs, ys = (yield from inp(0, x)), (yield from inp(0, y))
        params = {}
        for i, (w, b) in enumerate(zip(ws, bs)):
            params[f"w{i}"], params[f"b{i}"] = (yield from inp(1, w)), (yield from inp(1, b))
        net = mac_program.build(layers, params)
        loss = yield from mac_program.train_step(ctx, net, xs, ys, 0.1)
        return (yield from _output(ctx, loss))

    def _output(ctx, v):
        """As network sessions reveal: masked by a dealt mask (the requester's there), one
        MAC check."""
        r = ctx.auth(ctx.material("input", 0, tuple(v.shape))["r"], 0)
        return (yield from mac.open_masked(ctx, [(v, r)]))

    def inference_active(ctx):
        xs = yield from mac.input_value(ctx, 0, x if ctx.party == 0 else None, x.shape)
        params = {}
        for i, (w, b) in enumerate(zip(ws, bs)):
            for name, t in ((f"w{i}", w), (f"b{i}", b)):
                params[name] = yield from mac.input_value(ctx, 1, t if ctx.party == 1 else None,
                                                          t.shape)
        out = yield from mac_program.forward(ctx, mac_program.build(layers, params), xs,
                                             raw_output=True)
        return (yield from _output(ctx, out))

    def inference_semi_honest(ctx):
        def inp(owner, t):
            return input_shares(ctx, owner, t if ctx.party == owner else None, t.shape)
        xs = yield from inp(0, x)
        params = {}
        for i, (w, b) in enumerate(zip(ws, bs)):
            params[f"w{i}"], params[f"b{i}"] = (yield from inp(1, w)), (yield from inp(1, b))
        out = yield from autograd.predict(ctx, autograd.build(layers, params), xs,
                                          raw_output=True)
        return (yield from sh_reveal(ctx, out, decode=False))

    def run(name, mode):
        if name in ("train", "inference"):
            fns = {"train": (train_active, train_semi_honest),
                   "inference": (inference_active, inference_semi_honest)}[name]
            if mode == "active":
                return mac.run_active(args.parties, fns[0], dealer=MaterialDealer(args.parties))
            from p2pgrid.protocols.smpc.harness import run_parties
            return run_parties(args.parties, fns[1], config=SmpcConfig(truncation="dealer"))
        prog = relu_only
        kw = {"dealer": MaterialDealer(args.parties)} if mode == "active" else {}
        return run_program(args.parties, prog, security=mode, **kw)

    out = {}
    modes = ["semi-honest", "active"] if args.security == "both" else [args.security]
    for name in ("train", "inference", "relu"):
        for mode in modes:
            cpu, res = [], None
            for _ in range(args.reps):
                t0 = time.process_time()
                res = run(name, mode)
                cpu.append(time.process_time() - t0)
            dealer = getattr(res, "dealer_auth_bytes", None) or res.stats.dealer_bytes
            out[f"{name}/{mode}"] = {"cpu_ms": round(1000 * statistics.median(cpu), 1),
                                     "rounds": res.stats.rounds,
                                     "bytes_sent_per_party": res.stats.bytes_sent,
                                     "dealer_bytes_per_party": dealer}
            if args.by_tag:   # where the bytes go: all parties' payload per round tag
                out[f"{name}/{mode}"]["bytes_by_tag"] = res.stats.bytes_by_tag
    if args.security == "both":
        out["active/semi-honest"] = {
            name: {"cpu": round(out[f"{name}/active"]["cpu_ms"] / out[f"{name}/semi-honest"]["cpu_ms"], 2),
                   "bytes": round(max(out[f"{name}/active"]["bytes_sent_per_party"])
                                  / max(out[f"{name}/semi-honest"]["bytes_sent_per_party"]), 2),
                   "extra_rounds": out[f"{name}/active"]["rounds"] - out[f"{name}/semi-honest"]["rounds"]}
            for name in ("train", "inference", "relu")}
    return {"parties": args.parties, "batch": args.batch, "mlp": args.mlp, "reps": args.reps,
            "note": "in-process harness, all parties in one process (process CPU time), dealing "
                    "included; inputs are shared inside the programs", "ops": out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--security", choices=["semi-honest", "active", "both"], default=None,
                    help="compare the security modes on an MLP inference and a ReLU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mlp", default="784-128-64-10")
    ap.add_argument("--parties", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--truncation", default="auto", choices=["auto", "local", "dealer"])
    ap.add_argument("--by-tag", action="store_true",
                    help="also report the bytes every round tag sent (all parties)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.security:
        print(json.dumps(bench_security(args)))
        return
    config = SmpcConfig(truncation=args.truncation)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 784, generator=g, dtype=torch.float64)
    y = torch.randn(64, 784, generator=g, dtype=torch.float64)
    w = torch.randn(784, 128, generator=g, dtype=torch.float64) * 0.05
    h = torch.randn(64, 128, generator=g, dtype=torch.float64)
    result = {
        "parties": args.parties, "torch_threads": args.threads, "reps": args.reps,
        "frac_bits": config.frac_bits, "truncation": args.truncation,
        "note": "in-process harness; times cover all parties run sequentially, no network",
        "ops": {
            "mul_64x784": bench(mul, [x, y], args.parties, args.reps, config),
            "matmul_64x784_784x128": bench(matmul, [x, w], args.parties, args.reps, config),
            "relu_64x128": bench(relu, [h], args.parties, args.reps, config),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
