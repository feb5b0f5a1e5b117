#!/usr/bin/env python
"""The seeds' encrypted MNIST training, over real peers; prints one JSON object.

Two data-holding peers (hospital, clinic) each publish half of the training images
(MNIST test split, 640 images by default) and let the AI company compute on them;
the company has each owner secret-share its images and one-hot labels among the two
of them (university deals), encrypts an MLP 784-128-64-10 (ReLU) among the same
parties, and trains it with MSE and SGD in MPC: batch 64, 20 epochs. It then runs
encrypted inference on 640 other images (shared by the company) and reports the
accuracy, next to the same run in float (same initial weights, same batches).

    .venv/bin/python scripts/smpc_mnist.py [--data ../shared/data/mnist] [--epochs 20]

The peers run in this process on 127.0.0.1 (real TLS HTTP/2); see
scripts/bench_smpc.py for separate processes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import trio  # noqa: E402
from torch import nn  # noqa: E402

from p2pgrid import smpc  # noqa: E402
from p2pgrid.config import PeerConfig  # noqa: E402
from p2pgrid.testing import open_network  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def load_mnist(root: Path, split: str = "t10k") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 784) normalised as usual, and labels (N,), from the idx files."""
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[4:8], "big")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 784)
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - 0.1307) / 0.3081
    return x, torch.from_numpy(labels.astype(np.int64))


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def batches(n: int, batch: int):
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def train_float(x, y1h, xt, yt, args) -> tuple[float, list[float]]:
    model = mlp(args.seed).double()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses = []
    for _ in range(args.epochs):
        for rows in batches(len(x), args.batch):
            opt.zero_grad()
            loss = ((model(x[rows].double()) - y1h[rows].double()) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    with torch.no_grad():
        acc = (model(xt.double()).argmax(1) == yt).double().mean().item()
    return acc, losses


async def train_encrypted(x, y1h, xt, yt, args) -> dict:
    owners = ("hospital", "clinic")
    tmp = Path(tempfile.mkdtemp(prefix="smpc-mnist-"))
    # each owner lets the other hold shares of its data, the university dealing
    peers = [*(PeerConfig(name=o, data_dir=tmp / o, smpc_parties=owners,
                          crypto_providers=("university",)) for o in owners),
             PeerConfig(name="university", roles=("crypto-provider",),
                        data_dir=tmp / "university"), "company"]
    async with open_network(peers, tmp) as grid:
        half = len(x) // 2
        parts = {"hospital": slice(0, half), "clinic": slice(half, len(x))}
        for name, rows in parts.items():
            owner = grid.net(name)
            # the owners let the company train and read aggregates over whole batches
            # (each step's loss, the trained model); never a single image
            await owner.publish(x[rows], tags=["mnist-images"], compute=["company"],
                                aggregate=["company"])
            await owner.publish(y1h[rows], tags=["mnist-labels"], compute=["company"],
                                aggregate=["company"])
        net = grid.net("company")
        with trio.fail_after(30):   # until the company's directory lists both owners' data
            while True:
                found = [set(await net.search(tag)) for tag in ("#mnist-images", "#mnist-labels")]
                if all(set(owners) <= f for f in found):
                    break
                await trio.sleep(0.05)
        t0 = time.perf_counter()
        xs, ys = [], []
        for name in owners:   # each owner splits its own data; nobody sees it whole
            (img,) = (await net.search("#mnist-images"))[name]
            (lab,) = (await net.search("#mnist-labels"))[name]
            xs.append(await img.share(*owners, dealer="university"))
            ys.append(await lab.share(*owners, dealer="university"))
        X, Y = smpc.cat(xs), smpc.cat(ys)
        t_share = time.perf_counter() - t0

        model = await net.encrypt_model(mlp(args.seed), parties=owners, dealer="university",
                                        requires_grad=True)
        opt = smpc.SGD(model, lr=args.lr)
        losses, step_times = [], []
        t0 = time.perf_counter()
        for epoch in range(args.epochs):
            for rows in batches(len(x), args.batch):
                s0 = time.perf_counter()
                losses.append(await model.fit_batch(X[rows], Y[rows], loss="mse", optimizer=opt))
                step_times.append(time.perf_counter() - s0)
            shown = "withheld by the owners' rules" if losses[-1] is None else f"{losses[-1]:.4f}"
            print(f"epoch {epoch + 1}: loss {shown} "
                  f"({sum(step_times[-len(batches(len(x), args.batch)):]):.1f} s)",
                  file=sys.stderr, flush=True)
        t_train = time.perf_counter() - t0

        # encrypted inference: the company shares its test images, only it sees the outputs
        t0 = time.perf_counter()
        correct = 0
        for rows in batches(len(xt), args.batch):
            xb = await net.share(xt[rows], parties=owners, dealer="university")
            out = await model.predict(xb)
            correct += (out.argmax(1) == yt[rows]).sum().item()
            await xb.delete()
        t_infer = time.perf_counter() - t0
        plain = await model.decrypt()
        with torch.no_grad():
            dec_acc = (plain(xt.float()).argmax(1) == yt).double().mean().item()
    return {"accuracy": correct / len(xt), "decrypted_model_accuracy": dec_acc,
            "losses": losses, "share_s": t_share, "train_s": t_train,
            "step_s_median": float(np.median(step_times)), "inference_s": t_infer}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--test", type=int, default=640)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from fl_mnist import MNIST_HINT, require_data
    require_data(args.data / "t10k-images-idx3-ubyte.gz", MNIST_HINT)
    x, labels = load_mnist(args.data)
    if len(x) < args.train + args.test:
        raise SystemExit("not enough images")
    xtr, ytr = x[:args.train], labels[:args.train]
    xte, yte = x[args.train:args.train + args.test], labels[args.train:args.train + args.test]
    y1h = nn.functional.one_hot(ytr, 10).float()
    t0 = time.perf_counter()
    float_acc, float_losses = train_float(xtr, y1h, xte, yte, args)
    t_float = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc = trio.run(train_encrypted, xtr, y1h, xte, yte, args)
    wall = time.perf_counter() - t0
    result = {
        "setting": {"model": "784-128-64-10 ReLU", "loss": "mse", "optimizer": "sgd",
                    "lr": args.lr, "batch": args.batch, "epochs": args.epochs,
                    "train_images": args.train, "test_images": args.test,
                    "parties": ["hospital", "clinic"], "dealer": "university",
                    "trainer": "company", "frac_bits": 16},
        "float": {"accuracy": round(float_acc, 4), "final_loss": round(float_losses[-1], 5),
                  "seconds": round(t_float, 2)},
        "encrypted": {"accuracy": round(enc["accuracy"], 4),
                      "decrypted_model_accuracy": round(enc["decrypted_model_accuracy"], 4),
                      "final_loss": round(enc["losses"][-1], 5),
                      "max_loss_diff_vs_float": round(max(
                          abs(a - b) for a, b in zip(enc["losses"], float_losses)), 5),
                      "share_s": round(enc["share_s"], 2), "train_s": round(enc["train_s"], 2),
                      "step_s_median": round(enc["step_s_median"], 4),
                      "inference_s": round(enc["inference_s"], 2), "wall_s": round(wall, 2)},
        "accuracy_gap_points": round(100 * abs(enc["accuracy"] - float_acc), 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
