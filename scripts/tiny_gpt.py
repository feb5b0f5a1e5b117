#!/usr/bin/env python3
"""Public serving demo: train a tiny character-level GPT on the SMS corpus, serve it with
``allow_download=True``, download it on another peer (checked by hash), sample locally.

    python scripts/tiny_gpt.py --data ../shared/data/sms-spam/SMSSpamCollection.tsv

The data file is read where it is (never copied). Peers are real (TLS HTTP/2 on
loopback, gossip), started with :func:`p2pgrid.testing.open_network`. The model is
:class:`p2pgrid.serving.gpt.GPT` (Embedding, LayerNorm, Linear, GELU, matmul/softmax
attention); its character table travels inside it, as a buffer of code points, so the
downloaded module is all a user needs to sample. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import trio

from p2pgrid.modelgraph import model_hash
from p2pgrid.serving.gpt import GPT, generate


def load_corpus(path: Path) -> list[str]:
    """The message texts of the SMS corpus (label TAB text per line)."""
    texts = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            label, _, text = line.rstrip("\n").partition("\t")
            if text:
                texts.append(text)
    return texts


class Chars:
    """Characters seen at least `min_count` times; the rest map to one unknown symbol."""

    def __init__(self, text: str, min_count: int = 5):
        counts = Counter(text)
        self.chars = ["\x00"] + sorted(c for c, n in counts.items() if n >= min_count)
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, 0) for c in text], dtype=torch.long)

    def codes(self) -> torch.Tensor:
        return torch.tensor([ord(c) for c in self.chars], dtype=torch.float32)


def decode(model, ids) -> str:
    """Token ids -> text, with the character table the model carries."""
    table = model.get_buffer("vocab").long().tolist()
    return "".join(chr(table[i]) if i else "?" for i in ids)


def train(model: GPT, data: torch.Tensor, *, context: int, batch: int, steps: int,
          seconds: float, lr: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    lossf = torch.nn.CrossEntropyLoss()
    model.train()
    t0, step, recent = time.perf_counter(), 0, []
    while step < steps and time.perf_counter() - t0 < seconds:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + context] for s in starts])
        y = torch.stack([data[s + 1:s + context + 1] for s in starts])
        # linear warm-up, then cosine decay over whichever budget (steps, seconds) ends first
        done = min(1.0, max(step / steps, (time.perf_counter() - t0) / seconds))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * done))
        loss = lossf(model(x).reshape(-1, model.wte.num_embeddings), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        step += 1
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1),
            "train_loss_last100": round(sum(recent[-100:]) / len(recent[-100:]), 3)}


@torch.no_grad()
def evaluate(model, data: torch.Tensor, context: int) -> float:
    """Mean next-character cross-entropy (nats) over `data`, in non-overlapping windows."""
    n = (len(data) - 1) // context
    x = data[:n * context].view(n, context)
    y = data[1:n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, 256):
        logits = model(x[i:i + 256])
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   y[i:i + 256].reshape(-1), reduction="sum").item()
    return total / (n * context)


async def serve_download_sample(lm: GPT, chars: Chars, args) -> dict:
    from p2pgrid.testing import open_network

    with tempfile.TemporaryDirectory(prefix="tiny-gpt-") as tmp:
        async with open_network(["company", "bob"], tmp) as grid:
            company, bob = grid.net("company"), grid.net("bob")
            info = await company.serve_model(lm, "tiny-gpt", allow_download=True,
                                             description="char-level GPT trained on SMS messages")
            with trio.fail_after(20):
                while not [i for i in bob.models() if i.name == "tiny-gpt"]:
                    await trio.sleep(0.05)
            t0 = time.perf_counter()
            got = await bob.download_model("tiny-gpt")  # every chunk, the file and the model checked
            seconds = time.perf_counter() - t0
            ids = torch.randint(0, len(chars.chars), (4, args.context))
            same = torch.equal(got(ids), lm(ids))
            samples = []
            for i, prompt in enumerate(args.prompt):
                out = generate(got, chars.encode(prompt), args.sample_chars, context=args.context,
                               temperature=args.temperature,
                               generator=torch.Generator().manual_seed(args.seed + i))
                samples.append(decode(got, out.tolist()))
            return {"served_hash": info.hash, "downloaded_hash": model_hash(got),
                    "hash_verified": model_hash(got) == info.hash, "outputs_equal": same,
                    "package_bytes": info.size, "download_seconds": round(seconds, 2),
                    "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="SMSSpamCollection.tsv (label TAB text)")
    ap.add_argument("--seconds", type=float, default=120.0, help="training time budget")
    ap.add_argument("--steps", type=int, default=3000, help="training step budget")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--sample-chars", type=int, default=160)
    ap.add_argument("--prompt", action="append", default=None,
                    help="text to continue (repeatable; default: a few openings)")
    args = ap.parse_args()
    args.prompt = args.prompt or ["Hey, are you ", "FREE entry ", "Sorry, I'll "]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from fl_mnist import SMS_HINT, require_data
    require_data(args.data, SMS_HINT)
    texts = load_corpus(args.data)
    chars = Chars("\n".join(texts))
    cut = int(len(texts) * 0.9)
    train_ids = chars.encode("\n".join(texts[:cut]) + "\n")
    val_ids = chars.encode("\n".join(texts[cut:]) + "\n")
    counts = torch.bincount(train_ids, minlength=len(chars.chars)).double()
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * p.log()).sum())

    lm = GPT(vocab=len(chars.chars), context=args.context, width=args.width, depth=args.depth,
             heads=args.heads)
    lm.register_buffer("vocab", chars.codes())  # the character table travels with the model
    stats = train(lm, train_ids, context=args.context, batch=args.batch, steps=args.steps,
                  seconds=args.seconds, lr=args.lr, seed=args.seed)
    result = {
        "data": {"messages": len(texts), "train_chars": len(train_ids), "val_chars": len(val_ids),
                 "vocab": len(chars.chars)},
        "model": {"params": sum(p.numel() for p in lm.parameters()), "context": args.context,
                  "width": args.width, "depth": args.depth, "heads": args.heads},
        "training": stats,
        "val_loss_nats_per_char": round(evaluate(lm, val_ids, args.context), 3),
        "unigram_entropy_nats_per_char": round(unigram, 3),
    }
    result["serving"] = trio.run(serve_download_sample, lm, chars, args)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if result["serving"]["hash_verified"] and result["serving"]["outputs_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
