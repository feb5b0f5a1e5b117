"""Embedded default data for demos and profiles: generated here, never downloaded.

>>> x = build_dataset({"generator": "birth_records", "rows": 5, "seed": 1})
>>> tuple(x.shape), x.dtype
((5, 3), torch.float32)
"""

from __future__ import annotations

import numpy as np
import torch

BIRTH_COLUMNS = ("weight_kg", "height_cm", "gestation_weeks")


def birth_records(rows: int = 1000, seed: int = 0, month: int | None = None) -> torch.Tensor:
    """Synthetic newborn records: weight (kg), length (cm), gestational age (weeks).

    Weight and length are correlated through gestational age, as in real births.
    """
    rng = np.random.default_rng(seed if month is None else seed * 100 + month)
    weeks = np.clip(rng.normal(39.0, 1.6, rows), 30, 43)
    weight = np.clip(3.4 + 0.18 * (weeks - 39.0) + rng.normal(0, 0.42, rows), 0.8, 5.8)
    height = np.clip(50.5 + 0.9 * (weeks - 39.0) + 2.6 * (weight - 3.4) + rng.normal(0, 1.4, rows),
                     35, 60)
    return torch.from_numpy(np.stack([weight, height, weeks], axis=1).astype(np.float32))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (torch.from_numpy(d.data.astype(np.float32) / 16.0),
            torch.from_numpy(d.target.astype(np.int64)))


def build_dataset(item: dict) -> torch.Tensor:
    """Build the tensor a profile's ``[[dataset]]`` entry describes."""
    gen = item.get("generator", "birth_records")
    if gen == "birth_records":
        return birth_records(int(item.get("rows", 1000)), int(item.get("seed", 0)), item.get("month"))
    if gen == "digits":
        x, y = digits()
        return y if item.get("part") == "labels" else x
    if gen == "randn":
        g = torch.Generator().manual_seed(int(item.get("seed", 0)))
        return torch.randn(*item.get("shape", [10]), generator=g)
    raise ValueError(f"unknown dataset generator {gen!r} (birth_records, digits, randn)")
