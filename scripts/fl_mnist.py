"""Federated MNIST across peers in separate processes, compared with centralised training.

Three data peers (hospitals), each its own OS process, hold disjoint shards of the
first 8,000 images of the MNIST test split (IID, or sorted by label with
``--non-iid``) and publish them as an #x/#y pair that only the coordinator "ai" may
compute on. The coordinator (this process) trains a 784-128-64-10 MLP by FedAvg
and evaluates on the last 2,000 images, which only it holds. The same model,
from the same initial weights, is then trained centrally on all 8,000 images for
the same number of epochs (rounds x local epochs).

    python scripts/fl_mnist.py                    # IID, 5 rounds, 1 local epoch
    python scripts/fl_mnist.py --non-iid
    python scripts/fl_mnist.py --kill-round 3     # kill -9 one peer while it trains in round 3
    python scripts/fl_mnist.py --secure-aggregation

Prints a JSON summary last. The data is read from --data (default <repo>/../shared/data).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trio
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
N_TRAIN, N_TEST = 8000, 2000


# ------------------------------------------------------------------ data and model

def load_mnist(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test split (10,000 images) as float32 [N, 784] (standardised) and int64 labels."""
    with gzip.open(Path(data) / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 2051:
        raise SystemExit("not an IDX image file")
    images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, rows * cols)
    with gzip.open(Path(data) / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        raw = f.read()
    labels = np.frombuffer(raw[8:], dtype=np.uint8)
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - 0.1307) / 0.3081
    return x, torch.from_numpy(labels.astype(np.int64))


def shard_indices(n_peers: int, i: int, *, non_iid: bool, labels: torch.Tensor, seed: int = 0):
    """Disjoint shard `i` of the first N_TRAIN images: a random split, or sorted by label."""
    if non_iid:
        order = torch.argsort(labels[:N_TRAIN], stable=True)
    else:
        order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed))
    return order.tensor_split(n_peers)[i]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


# ------------------------------------------------------------------ peers in other processes

class Workers:
    """Data peers as child processes (``python SCRIPT worker ...``). Each prints
    ``READY <join>`` once its data is published and ``TRAINING <round>`` whenever it
    starts training; `on_line(name, line)` sees every line. `wrap(name, cmd)`, when
    given, returns the command to run instead (e.g. inside a lab host's namespace)."""

    def __init__(self, script: Path, on_line=None, wrap=None):
        self.script, self.on_line, self.wrap = script, on_line, wrap
        self.procs: dict[str, trio.Process] = {}
        self.ready: dict[str, trio.Event] = {}
        self.killed: list[str] = []

    async def start(self, nursery, name: str, args: list[str]) -> None:
        cmd = [sys.executable, str(self.script), "worker", "--name", name, *args]
        if self.wrap is not None:
            cmd = self.wrap(name, cmd)
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE,
                                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.procs[name] = proc
        self.ready[name] = trio.Event()
        nursery.start_soon(self._read, name, proc)

    async def _read(self, name, proc):
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                if text.startswith("READY"):
                    self.ready[name].set()
                if self.on_line is not None:
                    self.on_line(name, text)

    async def wait_ready(self, timeout: float = 120) -> None:
        """Until every worker is READY; fails at once if one exits before that."""
        with trio.fail_after(timeout):
            for name, ev in self.ready.items():
                while not ev.is_set():
                    code = self.procs[name].poll()
                    if code is not None:
                        raise RuntimeError(f"worker {name} exited with status {code} before it "
                                           "was ready (its error is above)")
                    with trio.move_on_after(0.2):
                        await ev.wait()

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            self.killed.append(name)

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            for proc in self.procs.values():
                await proc.wait()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()


async def serve_worker(name: str, data_dir: Path, join: str, publish, host: str = "127.0.0.1") -> None:
    """A data peer: start, publish with `publish(net)`, announce, then serve until killed."""
    from p2pgrid.config import PeerConfig
    from p2pgrid.federated import state_of
    from p2pgrid.network import Network
    from p2pgrid.peer import open_peer

    from p2pgrid.federated.owner import warm_up

    torch.set_num_threads(1)
    warm_up()  # torch's lazy imports happen now, not in round 1
    cfg = PeerConfig(name=name, data_dir=data_dir, mdns=False, join=(join,), gossip_interval=0.5,
                     host=host)
    async with open_peer(cfg) as peer:
        state = state_of(peer)
        original = state.train

        def announced(spec, params, x, y, config, should_stop):
            print(f"TRAINING {config.get('round')}", flush=True)
            return original(spec, params, x, y, config, should_stop)

        state.train = announced
        await publish(Network(peer))
        print(f"READY {peer.key_id}@{peer.address}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                return


async def wait_for_data(net, query: str, names, timeout: float = 60) -> None:
    from p2pgrid.federated.data import find_shards
    with trio.fail_after(timeout):
        while not set(names) <= set(find_shards(net.me.directory, query)):
            await trio.sleep(0.05)


# ------------------------------------------------------------------ the run

def centralised(model, x, y, x_test, y_test, *, epochs, batch_size, lr, momentum, seed=0):
    from p2pgrid.protocols.local_train import evaluate, train_locally
    t0 = time.perf_counter()
    opt = {"name": "sgd", "lr": lr, **({"momentum": momentum} if momentum else {})}
    train_locally(model, x, y, epochs=epochs, batch_size=batch_size, optimizer=opt,
                  loss="cross_entropy", seed=seed)
    return evaluate(model, x_test, y_test, "cross_entropy")["accuracy"], time.perf_counter() - t0


async def coordinate(args) -> dict:
    import p2pgrid
    from p2pgrid.federated import SGD, FedAvg

    torch.set_num_threads(1)
    x, y = load_mnist(args.data)
    x_test, y_test = x[N_TRAIN:N_TRAIN + N_TEST], y[N_TRAIN:N_TRAIN + N_TEST]
    names = [f"hospital{i + 1}" for i in range(args.peers)]
    victim = names[-1]
    workers = Workers(Path(__file__))
    kill_at = []

    def on_line(name, line):
        if line == f"TRAINING {args.kill_round}" and name == victim and not workers.killed:
            workers.kill(name)
            kill_at.append(time.time())
            print(f"killed {name} (kill -9) while it trained round {args.kill_round}", file=sys.stderr)

    workers.on_line = on_line if args.kill_round else None
    tmp = Path(tempfile.mkdtemp(prefix="fl-mnist-"))
    t_start = time.perf_counter()
    async with p2pgrid.connect("ai", mdns=False, data_dir=tmp / "ai", wait=0,
                               gossip_interval=0.5) as net, trio.open_nursery() as nursery:
        join = f"{net.me.key_id}@{net.me.address}"
        for i, name in enumerate(names):
            await workers.start(nursery, name, [
                "--data", str(args.data), "--shard", str(i), "--shards", str(args.peers),
                "--dir", str(tmp / name), "--join", join, *(["--non-iid"] if args.non_iid else [])])
        try:
            await workers.wait_ready()
            await wait_for_data(net, "#mnist #train", names)
            t_ready = time.perf_counter()
            result = await net.federated_fit(
                mlp(args.seed), "#mnist #train", rounds=args.rounds, local_epochs=args.local_epochs,
                batch_size=args.batch_size, optimizer=SGD(lr=args.lr, momentum=args.momentum),
                strategy=FedAvg(min_peers=2, round_timeout=args.round_timeout),
                secure_aggregation=args.secure_aggregation, evaluate=(x_test, y_test),
                seed=args.seed, progress=not args.no_progress)
            t_fit = time.perf_counter() - t_ready
            if args.secure_aggregation:  # the same run without it, to compare the final weights
                plain = await net.federated_fit(
                    mlp(args.seed), "#mnist #train", rounds=args.rounds,
                    local_epochs=args.local_epochs, batch_size=args.batch_size,
                    optimizer=SGD(lr=args.lr, momentum=args.momentum),
                    strategy=FedAvg(min_peers=2, round_timeout=args.round_timeout),
                    evaluate=(x_test, y_test), seed=args.seed, progress=not args.no_progress,
                    job="plain-for-comparison")
        finally:
            await workers.close()
            nursery.cancel_scope.cancel()
    shutil.rmtree(tmp, ignore_errors=True)
    central_acc, central_s = centralised(mlp(args.seed), x[:N_TRAIN], y[:N_TRAIN], x_test, y_test,
                                         epochs=args.rounds * args.local_epochs,
                                         batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                                         seed=args.seed)
    fed_acc = result.history[-1].accuracy
    compare = {}
    if args.secure_aggregation:
        compare = {"plain_accuracy": plain.history[-1].accuracy,
                   "max_abs_weight_difference_secure_vs_plain": max(
                       (result.params[k] - plain.params[k]).abs().max().item() for k in plain.params)}
    return {
        "script": "fl_mnist", "peers": args.peers, "processes": args.peers + 1,
        "split": "non-iid (sorted by label)" if args.non_iid else "iid",
        "rounds": args.rounds, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
        "optimizer": {"sgd": {"lr": args.lr, "momentum": args.momentum}},
        "secure_aggregation": args.secure_aggregation, "killed": workers.killed,
        "federated_accuracy": fed_acc, "centralised_accuracy": central_acc,
        "gap_points": round(100 * (central_acc - fed_acc), 2), **compare,
        "startup_seconds": round(t_ready - t_start, 2),
        "federated_seconds": round(t_fit, 2), "centralised_seconds": round(central_s, 2),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "history": [{"round": h.round, "peers": h.peers, "failures": h.failures,
                     "train_loss": h.loss, "accuracy": h.accuracy, "bytes": h.bytes,
                     "seconds": round(h.seconds, 3)} for h in result.history],
    }


async def run_worker(args) -> None:
    x, y = load_mnist(args.data)
    idx = shard_indices(args.shards, args.shard, non_iid=args.non_iid, labels=y)

    async def publish(net):
        await net.federated_publish(x[idx].clone(), y[idx].clone(), tags=["mnist", "train"],
                                    compute=["ai"], description=f"MNIST shard {args.shard}")

    await serve_worker(args.name, args.dir, args.join, publish, host=args.host or "127.0.0.1")


MNIST_HINT = ("MNIST (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, train-*) comes from "
              "https://yann.lecun.com/exdb/mnist/ or a mirror such as "
              "https://ossci-datasets.s3.amazonaws.com/mnist/")
SMS_HINT = ("the SMS Spam Collection (SMSSpamCollection, label TAB text) comes from "
            "https://archive.ics.uci.edu/dataset/228/sms+spam+collection")


def require_data(path: Path, hint: str) -> None:
    """Exit with one line saying where to get the data when `path` is missing."""
    if not Path(path).exists():
        raise SystemExit(f"{Path(sys.argv[0]).name}: no data at {path}; {hint} "
                         "(or give --data DIR)")


def run_script(args, coordinate, run_worker=None) -> int:
    """Run one process of a script: a data worker, or the coordinator, whose JSON
    summary is printed (and written to ``--json`` when given)."""
    if run_worker is not None and getattr(args, "mode", None) == "worker":
        trio.run(run_worker, args)
        return 0
    text = json.dumps(trio.run(coordinate, args), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="run", choices=["run", "worker"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding mnist/ (default %(default)s)")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--non-iid", action="store_true", help="shards sorted by label")
    p.add_argument("--kill-round", type=int, default=0, help="kill -9 one peer while it trains this round")
    p.add_argument("--secure-aggregation", action="store_true")
    p.add_argument("--round-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", type=Path, help="also write the summary here")
    # worker mode
    p.add_argument("--name")
    p.add_argument("--shard", type=int)
    p.add_argument("--shards", type=int)
    p.add_argument("--dir", type=Path)
    p.add_argument("--join")
    p.add_argument("--host", help="address the worker listens on (default 127.0.0.1)")
    args = p.parse_args(argv)
    require_data(args.data / "mnist" / "t10k-images-idx3-ubyte.gz", MNIST_HINT)
    return run_script(args, coordinate, run_worker)


if __name__ == "__main__":
    sys.exit(main())
