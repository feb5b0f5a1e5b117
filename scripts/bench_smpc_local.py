#!/usr/bin/env python
"""Local SMPC benchmark: in-process harness, no network. Prints one JSON object.

For each op (2 parties by default): online ms (dealer material prefetched and
expanded beforehand, as a batched offline phase would), offline ms (dealing +
seed expansion for the op), end-to-end ms (dealing on demand), rounds, payload bytes
sent per party, and bytes each party received from the dealer. Times are medians over
--reps runs and cover *all* parties, which run one after another in this process
(a party's own share of the work is about 1/n of it); no network latency is included.

    .venv/bin/python scripts/bench_smpc_local.py [--parties 2] [--reps 5] [--threads 1]
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

from protocols.smpc import (DealerFeed, LocalDealer, SmpcConfig, matmul, mul, relu,  # noqa: E402
                            run_parties)
from protocols.smpc.testing import share_inputs  # noqa: E402


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parties", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--truncation", default="auto", choices=["auto", "local", "dealer"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
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
