"""A reduced version of scripts/smpc_mnist.py: encrypted MNIST training over real peers
tracks the same run in float (fewer images and epochs, to fit a test budget)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import smpc_mnist  # noqa: E402

pytestmark = pytest.mark.skipif(not (smpc_mnist.DEFAULT_DATA / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="MNIST test split not in ../shared/data/mnist")


class Args:
    seed, lr, batch = 0, 0.5, 64
    epochs = 3


async def test_encrypted_mnist_tracks_float():
    x, labels = smpc_mnist.load_mnist(smpc_mnist.DEFAULT_DATA)
    xtr, ytr = x[:128], labels[:128]
    xte, yte = x[1000:1128], labels[1000:1128]
    y1h = nn.functional.one_hot(ytr, 10).float()
    float_acc, float_losses = smpc_mnist.train_float(xtr, y1h, xte, yte, Args)
    enc = await smpc_mnist.train_encrypted(xtr, y1h, xte, yte, Args)
    assert len(enc["losses"]) == len(float_losses) == 6
    assert max(abs(a - b) for a, b in zip(enc["losses"], float_losses)) < 2e-3
    assert enc["losses"][-1] < enc["losses"][0]
    assert abs(enc["accuracy"] - float_acc) <= 0.03      # at most ~4 of 128 test images
    assert enc["accuracy"] == pytest.approx(enc["decrypted_model_accuracy"], abs=0.02)
    torch.testing.assert_close(torch.tensor(enc["losses"]), torch.tensor(float_losses),
                               atol=2e-3, rtol=0)
