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
    return dataset_with_columns(item)[0]


def dataset_with_columns(item: dict) -> tuple[torch.Tensor, list[str]]:
    """The tensor of a profile's ``[[dataset]]`` entry and its column names: read from
    ``path`` (see :func:`load_file`; relative to the profile) or built by ``generator``."""
    if item.get("path"):
        tensor, columns, _ = load_file(item["path"], tensor_name=item.get("tensor"))
        return tensor, columns
    gen = item.get("generator", "birth_records")
    if gen == "birth_records":
        return _generate(item), list(BIRTH_COLUMNS)
    return _generate(item), []


GENERATORS = ("birth_records", "digits", "randn")


def _generate(item: dict) -> torch.Tensor:
    gen = item.get("generator", "birth_records")
    if gen == "birth_records":
        return birth_records(int(item.get("rows", 1000)), int(item.get("seed", 0)), item.get("month"))
    if gen == "digits":
        x, y = digits()
        return y if item.get("part") == "labels" else x
    if gen == "randn":
        g = torch.Generator().manual_seed(int(item.get("seed", 0)))
        return torch.randn(*item.get("shape", [10]), generator=g)
    raise ValueError(f"unknown dataset generator {gen!r} (one of: {', '.join(GENERATORS)}; "
                     "or give path = FILE)")


# ------------------------------------------------------------------ the owner's own files
# Readers that cannot run code: pyarrow for CSV and Parquet, numpy with
# allow_pickle=False for .npy, the safetensors format (a JSON header and raw bytes)
# for tensor files. Never pickle, never torch.load.

FILE_KINDS = (".csv", ".parquet", ".npy", ".safetensors")


def load_file(path, *, tensor_name: str | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """Read a data file into (tensor, column names, notes).

    Tables (CSV with a header, Parquet) keep their numeric columns, in order, as the
    columns of a 2-d tensor of their common dtype; the names travel as the schema.
    Columns that are not numeric are left out (and named in ``notes``).
    A .safetensors file must hold one tensor, or name it with `tensor_name`.
    """
    from pathlib import Path

    from .errors import BadRequest

    path = Path(path)
    kind = path.suffix.lower()
    if kind not in FILE_KINDS:
        raise BadRequest(f"{path.name}: unknown kind of file; p2pgrid reads {', '.join(FILE_KINDS)}")
    if not path.is_file():
        raise BadRequest(f"{path}: no such file")
    try:
        if kind in (".csv", ".parquet"):
            return _load_table(path, kind)
        if kind == ".npy":
            arr = np.load(path, allow_pickle=False)
            return _from_numpy(arr, path), [], []
        from safetensors.numpy import load_file as load_st
        tensors = load_st(str(path))
    except BadRequest:
        raise
    except Exception as e:  # the readers' own errors: say which file and why, in one line
        raise BadRequest(f"{path.name}: cannot read it: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tensor_name is None:
        if len(tensors) != 1:
            raise BadRequest(f"{path.name} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                             "name one with --tensor")
        tensor_name = next(iter(tensors))
    if tensor_name not in tensors:
        raise BadRequest(f"{path.name} has no tensor {tensor_name!r} ({', '.join(sorted(tensors))})")
    return _from_numpy(tensors[tensor_name], path), [], []


def _from_numpy(arr, path) -> torch.Tensor:
    from .errors import BadRequest

    if arr.dtype.kind not in "biuf":
        raise BadRequest(f"{path.name}: dtype {arr.dtype} is not numeric")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        arr = arr.astype(np.int64)  # torch has no wider unsigned types to store
    return torch.from_numpy(np.ascontiguousarray(arr).copy())


def _load_table(path, kind: str) -> tuple[torch.Tensor, list[str], list[str]]:
    import pyarrow as pa

    from .errors import BadRequest

    if kind == ".csv":
        import pyarrow.csv as pacsv
        table = pacsv.read_csv(path)
    else:
        import pyarrow.parquet as pq
        table = pq.read_table(path)
    names, cols, notes = [], [], []
    for name, column in zip(table.column_names, table.columns):
        t = column.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            values = column.to_numpy()  # nulls become NaN (ints with nulls become floats)
            names.append(str(name))
            cols.append(values.astype(np.uint8) if values.dtype == bool else values)
        else:
            notes.append(f"column {name!r} ({t}) is not numeric: left out")
    if not cols:
        raise BadRequest(f"{path.name}: no numeric columns")
    dtype = np.result_type(*[c.dtype for c in cols])
    arr = np.stack([c.astype(dtype, copy=False) for c in cols], axis=1)
    return _from_numpy(arr, path), names, notes
