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
    """Both modes on one run: an MLP inference (matmul, ReLU, matmul, reveal) and a ReLU."""
    from p2pgrid.protocols.smpc.modes import run_program
    g = torch.Generator().manual_seed(0)
    dims = [int(d) for d in args.mlp.split("-")]
    x = torch.randn(args.batch, dims[0], generator=g)
    ws = [torch.randn(a, b, generator=g) * 0.1 for a, b in zip(dims, dims[1:])]
    h = torch.randn(args.batch, dims[1], generator=g)

    def inference(ops):
        cur = yield from ops.input(0, x if ops.party == 0 else None, x.shape)
        wsh = []
        for w in ws:
            wsh.append((yield from ops.input(1, w if ops.party == 1 else None, w.shape)))
        for i, w in enumerate(wsh):
            cur = yield from ops.matmul(cur, w)
            if i < len(wsh) - 1:
                cur = yield from ops.relu(cur)
        return (yield from ops.reveal(cur))

    def relu_only(ops):
        v = yield from ops.input(0, h if ops.party == 0 else None, h.shape)
        return (yield from ops.reveal((yield from ops.relu(v))))

    out = {}
    modes = ["semi-honest", "active"] if args.security == "both" else [args.security]
    for name, prog in (("inference", inference), ("relu", relu_only)):
        for mode in modes:
            times, res = [], None
            for _ in range(args.reps):
                t0 = time.perf_counter()
                res = run_program(args.parties, prog, security=mode)
                times.append(time.perf_counter() - t0)
            dealer = getattr(res, "dealer_auth_bytes", None) or res.stats.dealer_bytes
            out[f"{name}/{mode}"] = {"ms": round(1000 * statistics.median(times), 1),
                                     "rounds": res.stats.rounds,
                                     "bytes_sent_per_party": res.stats.bytes_sent,
                                     "dealer_bytes_per_party": dealer}
    return {"parties": args.parties, "batch": args.batch, "mlp": args.mlp, "reps": args.reps,
            "note": "in-process harness, all parties in one process, dealing included; "
                    "active mode holds shares as Python ints (Z_2^128)", "ops": out}


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
