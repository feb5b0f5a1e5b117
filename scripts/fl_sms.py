"""Federated SMS-spam detection with a GRU across two phones (Bob and Anne), as separate processes.

The SMS Spam Collection (5,574 messages) is split once with a fixed seed into 80%
for training and a held-out 20% for testing. The training part is divided between
two data peers, "bob" and "anne", each its own OS process, each publishing its
messages as token ids (#x) and labels (#y) that only the coordinator "ai" may
compute on. The tokenizer is deliberately simple: lowercase words, a vocabulary
of the words seen at least twice in the *training* messages (never the test
ones), ids left-padded to a fixed length. Both phones derive the same vocabulary
(a stand-in for one agreed in advance). The model is Embedding -> GRU -> Linear
(the last hidden state), trained by FedAvg; AUC is measured on the held-out 20%.

    python scripts/fl_sms.py                      # 5 rounds, Adam lr 0.005
    python scripts/fl_sms.py --secure-aggregation

Prints a JSON summary last. The data is read from --data (default <repo>/../shared/data).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trio
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fl_mnist import DEFAULT_DATA, SMS_HINT, Workers, require_data, run_script, serve_worker, wait_for_data  # noqa: E402

PEERS = ["bob", "anne"]
_WORD = re.compile(r"[a-z0-9£$']+")


def load_sms(data: Path) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    with open(Path(data) / "sms-spam" / "SMSSpamCollection.tsv", encoding="utf-8") as f:
        header = f.readline()
        if not header.lower().startswith("label"):
            raise SystemExit("unexpected header in SMSSpamCollection.tsv")
        for line in f:
            label, _, text = line.rstrip("\n").partition("\t")
            if label in ("ham", "spam"):
                texts.append(text)
                labels.append(1 if label == "spam" else 0)
    return texts, np.array(labels, dtype=np.int64)


def split(n: int, seed: int = 0, test_share: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - test_share)))
    return order[:cut], order[cut:]


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Tokenizer:
    """Words seen at least `min_count` times in the training texts; 0 pads, 1 is unknown."""

    def __init__(self, train_texts: list[str], *, min_count: int = 2, max_words: int = 8000,
                 length: int = 48):
        counts = collections.Counter(w for t in train_texts for w in tokens(t))
        words = [w for w, c in counts.most_common(max_words) if c >= min_count]
        self.index = {w: i + 2 for i, w in enumerate(words)}
        self.length = length

    @property
    def vocab_size(self) -> int:
        return len(self.index) + 2

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.length, dtype=torch.int64)
        for i, t in enumerate(texts):
            ids = [self.index.get(w, 1) for w in tokens(t)][-self.length:]
            if ids:
                out[i, self.length - len(ids):] = torch.tensor(ids)   # left-padded
        return out


class SpamGRU(nn.Module):
    def __init__(self, vocab: int, emb: int = 64, hidden: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb, padding_idx=0)
        self.gru = nn.GRU(emb, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x):
        h = self.gru(self.emb(x))[0]
        return self.out(h[:, -1])


def dataset(data: Path, seed: int):
    texts, labels = load_sms(data)
    train, test = split(len(texts), seed)
    tok = Tokenizer([texts[i] for i in train])
    return texts, labels, train, test, tok


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores))


@torch.no_grad()
def spam_scores(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.softmax(model(x), dim=1)[:, 1].numpy()


async def coordinate(args) -> dict:
    import p2pgrid
    from p2pgrid.federated import Adam, FedAvg
    from p2pgrid.protocols.local_train import evaluate, train_locally

    torch.set_num_threads(1)
    texts, labels, train, test, tok = dataset(args.data, args.seed)
    x_test, y_test = tok.encode([texts[i] for i in test]), torch.from_numpy(labels[test])
    workers = Workers(Path(__file__))
    tmp = Path(tempfile.mkdtemp(prefix="fl-sms-"))
    t_start = time.perf_counter()
    async with p2pgrid.connect("ai", mdns=False, data_dir=tmp / "ai", wait=0,
                               gossip_interval=0.5) as net, trio.open_nursery() as nursery:
        join = f"{net.me.key_id}@{net.me.address}"
        for i, name in enumerate(PEERS):
            await workers.start(nursery, name, ["--data", str(args.data), "--part", str(i),
                                                "--dir", str(tmp / name), "--join", join,
                                                "--seed", str(args.seed)])
        try:
            await workers.wait_ready()
            await wait_for_data(net, "#sms #train", PEERS)
            t_ready = time.perf_counter()
            torch.manual_seed(args.seed)
            model = SpamGRU(tok.vocab_size)
            result = await net.federated_fit(
                model, "#sms #train", rounds=args.rounds, local_epochs=args.local_epochs,
                batch_size=args.batch_size, optimizer=Adam(lr=args.lr),
                strategy=FedAvg(min_peers=2, round_timeout=args.round_timeout),
                secure_aggregation=args.secure_aggregation, evaluate=(x_test, y_test),
                seed=args.seed, progress=not args.no_progress)
            t_fit = time.perf_counter() - t_ready
        finally:
            await workers.close()
            nursery.cancel_scope.cancel()
    shutil.rmtree(tmp, ignore_errors=True)
    fed_auc = auc(spam_scores(result.model, x_test), labels[test])
    out = {"script": "fl_sms", "peers": PEERS, "processes": len(PEERS) + 1,
           "train_messages": len(train), "test_messages": len(test), "vocab": tok.vocab_size,
           "rounds": args.rounds, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
           "optimizer": {"adam": {"lr": args.lr}}, "secure_aggregation": args.secure_aggregation,
           "test_auc": round(fed_auc, 4), "test_accuracy": result.history[-1].accuracy,
           "startup_seconds": round(t_ready - t_start, 2), "federated_seconds": round(t_fit, 2), "wall_seconds": round(time.perf_counter() - t_start, 2),
           "history": [{"round": h.round, "peers": h.peers, "train_loss": h.loss,
                        "accuracy": h.accuracy, "bytes": h.bytes, "seconds": round(h.seconds, 2)}
                       for h in result.history]}
    if args.centralised:
        torch.manual_seed(args.seed)
        central = SpamGRU(tok.vocab_size)
        x_train = tok.encode([texts[i] for i in train])
        t0 = time.perf_counter()
        train_locally(central, x_train, torch.from_numpy(labels[train]),
                      epochs=args.rounds * args.local_epochs, batch_size=args.batch_size,
                      optimizer={"name": "adam", "lr": args.lr}, loss="cross_entropy", seed=args.seed)
        out["centralised_auc"] = round(auc(spam_scores(central, x_test), labels[test]), 4)
        out["centralised_accuracy"] = evaluate(central, x_test, y_test, "cross_entropy")["accuracy"]
        out["centralised_seconds"] = round(time.perf_counter() - t0, 2)
    return out


async def run_worker(args) -> None:
    texts, labels, train, _, tok = dataset(args.data, args.seed)
    mine = np.array_split(train, len(PEERS))[args.part]

    async def publish(net):
        x = tok.encode([texts[i] for i in mine])
        y = torch.from_numpy(labels[mine])
        await net.federated_publish(x, y, tags=["sms", "train"], compute=["ai"],
                                    description=f"{args.name}'s messages (token ids)")

    await serve_worker(args.name, args.dir, args.join, publish)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="run", choices=["run", "worker"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding sms-spam/ (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--secure-aggregation", action="store_true")
    p.add_argument("--centralised", action="store_true", help="also train centrally, for comparison")
    p.add_argument("--round-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--name")
    p.add_argument("--part", type=int)
    p.add_argument("--dir", type=Path)
    p.add_argument("--join")
    args = p.parse_args(argv)
    require_data(args.data / "sms-spam" / "SMSSpamCollection.tsv", SMS_HINT)
    return run_script(args, coordinate, run_worker)


if __name__ == "__main__":
    sys.exit(main())
