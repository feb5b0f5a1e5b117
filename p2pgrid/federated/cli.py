"""``p2pgrid fit``: federated training from the command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EPILOG = """examples:
  p2pgrid fit '#mnist #train' --mlp 784,128,64,10 --rounds 5 --evaluate '#mnist #test'
  p2pgrid fit '#sms #train' --model gru.p2pmodel --optimizer adam --lr 0.005 --secure-aggregation
  p2pgrid fit '#mnist #train' --mlp 784,10 --dp-clip 1.0 --dp-noise 1.1 --out final.p2pmodel

A model file is a p2pgrid model spec (CBOR; see p2pgrid.federated.save_model): layers
and ops from a whitelist plus weights, never pickled code.
"""


def add_cli(subparsers) -> dict:
    from ..cli import add_network_options

    p = subparsers.add_parser(
        "fit", help="train a model by federated averaging over peers' data",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Join the network, find every peer publishing an #x/#y pair with the "
                    "DATA tags that lets you compute on it, and train MODEL by federated "
                    "averaging: the model travels, the data stays.")
    p.add_argument("data", help="tags of the training data, e.g. '#mnist #train'")
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--model", type=Path, help="a model spec file (p2pgrid.federated.save_model)")
    m.add_argument("--mlp", metavar="SIZES", help="a ReLU MLP, e.g. 784,128,64,10")
    t = p.add_argument_group("training")
    t.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    t.add_argument("--local-epochs", type=int, default=1,
                   help="passes over its own data each peer makes per round (default 1)")
    t.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="each peer's local optimizer (default sgd)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: sgd 0.05, adam 0.001)")
    t.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    t.add_argument("--loss", choices=["cross_entropy", "bce_with_logits", "mse"], default="cross_entropy",
                   help="training loss (default cross_entropy: class labels)")
    t.add_argument("--clip-grad-norm", type=float, default=None, metavar="NORM",
                   help="clip each local step's gradient to this L2 norm (e.g. 5 for an LSTM)")
    t.add_argument("--wait-for", default=None, metavar="PEERS|N",
                   help="before round 1, wait for these data holders (comma-separated names) or "
                        "for N of them to be visible")
    t.add_argument("--wait-timeout", type=float, default=60.0, help="seconds (default 60)")
    s = p.add_argument_group("strategy")
    s.add_argument("--strategy", choices=["fedavg", "fedprox", "fedadam", "fedmedian"], default="fedavg",
                   help="fedmedian: coordinate-wise median, robust to one peer's bad update; every "
                        "peer trains, no secure aggregation or client-level DP")
    s.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal weight")
    s.add_argument("--server-lr", type=float, default=0.1, help="FedAdam's eta")
    s.add_argument("--min-peers", type=int, default=2,
                   help="fewest peers whose updates a round needs (default 2)")
    s.add_argument("--fraction", type=float, default=1.0, help="share of peers sampled per round")
    s.add_argument("--round-timeout", type=float, default=60.0, help="seconds (default 60)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights and of local shuffling (not of privacy noise)")
    pr = p.add_argument_group("privacy")
    pr.add_argument("--secure-aggregation", action="store_true",
                    help="the coordinator only ever sees the sum of the updates")
    pr.add_argument("--dp-clip", type=float, help="client-level DP: clip each update to this L2 norm")
    pr.add_argument("--dp-noise", type=float, default=1.0, help="client-level DP noise multiplier")
    pr.add_argument("--local-dp-clip", type=float, help="per-example DP-SGD on the peers: clip")
    pr.add_argument("--local-dp-noise", type=float, default=1.0, help="per-example DP-SGD noise multiplier")
    pr.add_argument("--delta", type=float, default=1e-5, help="delta for the reported epsilon")
    o = p.add_argument_group("output")
    o.add_argument("--evaluate", help="tags of held-out data on peers, e.g. '#mnist #test'")
    o.add_argument("--out", type=Path, help="write the final model spec here")
    o.add_argument("--job", help="job name (checkpoints live under it)")
    o.add_argument("--resume", action="store_true", help="continue the job from its checkpoint")
    o.add_argument("--json", action="store_true", help="print the history as JSON")
    o.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    add_network_options(p)
    return {"fit": run_fit}


def _mlp(sizes: str):
    from torch import nn

    dims = [int(s) for s in sizes.split(",") if s.strip()]
    if len(dims) < 2 or min(dims) < 1:
        raise SystemExit("--mlp needs at least two positive sizes, e.g. 784,128,10")
    layers = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _wait_for(value: str | None):
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    return [p.strip() for p in value.split(",") if p.strip()]


def _strategy(args):
    from p2pgrid.protocols.fedavg import FedAdam, FedAvg, FedMedian, FedProx

    if args.strategy == "fedmedian":
        return FedMedian(min_peers=args.min_peers, round_timeout=args.round_timeout)
    common = dict(min_peers=args.min_peers, fraction=args.fraction, round_timeout=args.round_timeout,
                  seed=args.seed)
    if args.strategy == "fedprox":
        return FedProx(mu=args.mu, **common)
    if args.strategy == "fedadam":
        return FedAdam(eta=args.server_lr, **common)
    return FedAvg(**common)


async def run_fit(args) -> int:
    from ..cli import _ephemeral
    from ..errors import P2PError
    from . import SGD, Adam, ClientDP, LocalDP, load_model, save_model

    model = load_model(args.model) if args.model else _mlp(args.mlp)
    if args.optimizer == "adam":
        opt = Adam(lr=args.lr or 1e-3)
    else:
        opt = SGD(lr=args.lr or 0.05, momentum=args.momentum)
    dp = []
    if args.dp_clip is not None:
        dp.append(ClientDP(clip=args.dp_clip, noise_multiplier=args.dp_noise, delta=args.delta))
    if args.local_dp_clip is not None:
        dp.append(LocalDP(clip=args.local_dp_clip, noise_multiplier=args.local_dp_noise, delta=args.delta))
    try:
        async with await _ephemeral(args) as net:
            result = await net.federated_fit(
                model, args.data, rounds=args.rounds, local_epochs=args.local_epochs,
                batch_size=args.batch_size, optimizer=opt, loss=args.loss, strategy=_strategy(args),
                secure_aggregation=args.secure_aggregation, dp=dp or None, evaluate=args.evaluate,
                resume=args.resume, job=args.job, seed=args.seed, progress=args.progress,
                clip_grad_norm=args.clip_grad_norm, wait_for=_wait_for(args.wait_for),
                wait_timeout=args.wait_timeout)
    except P2PError as e:
        print(f"p2pgrid fit: {type(e).__name__}: {e.message}", file=sys.stderr)
        return 1
    if args.out:
        save_model(result.model, args.out)
    rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in dict(h.to_dict(), bytes=h.bytes).items()} for h in result.history]
    if args.json:
        print(json.dumps({"job": result.job, "history": rows, "excluded": result.excluded}, indent=2))
    else:
        print(f"job {result.job}: {len(result.history)} rounds")
        for h in result.history:
            acc = "" if h.accuracy is None else f" accuracy {h.accuracy:.4f}"
            eps = "" if h.epsilon is None else f" epsilon {h.epsilon:.3f}"
            loss = "" if h.loss is None else f" loss {h.loss:.4f}"
            print(f"  round {h.round}: {len(h.peers)} peers{loss}{acc}{eps} "
                  f"{h.bytes / 1e6:.2f} MB {h.seconds:.2f} s")
            for p, why in h.unused.items():
                print(f"    not used: {p}: {why}")
        for p, why in result.excluded.items():
            print(f"  excluded {p}: {why}")
        if args.out:
            print(f"model written to {args.out}")
    return 0
