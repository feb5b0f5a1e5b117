"""What a remote program may cost its host: limits per caller and the cost model.

A program is refused before any work if its dry run on ``meta`` tensors (see
:func:`p2pgrid.ops.evaluate`) shows that it would need more than a caller's
:class:`Limits`: the peak of the memory *live at once* over the whole program
(leaves, constants and intermediates, each freed after its last use, views
sharing their base's memory), or more floating-point operations than allowed.
The wall-clock limit and the number of programs a caller may have running at
once are enforced by :mod:`p2pgrid.worker`, which runs the real work where it can
be stopped.

The estimates are upper bounds of the kind that matter for availability, not
exact counts: an elementwise op costs its output's elements, a reduction its
input's, a matmul ``2*m*n*k``; transcendental functions weigh more.

>>> import torch
>>> m = Meter(Limits(memory=1 << 20, flops=1e6))
>>> a = torch.empty(64, 64, device="meta")
>>> m.node(0, "matmul", [a, a], a, live=2 * a.nbytes)
>>> m.flops, m.peak
(524288.0, 32768)
>>> m.node(1, "matmul", [a, a], a, live=2 * a.nbytes)
Traceback (most recent call last):
...
p2pgrid.errors.ComputeLimitExceeded: node 1 (matmul) brings the program to 1048576 floating-point operations; this peer allows 1000000 per program (program_flops)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch

from .errors import ComputeLimitExceeded

__all__ = ["Limits", "Meter", "limits_for", "op_flops", "nbytes"]

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """What one caller's program may cost. Defaults keep a 2-core, 8 GiB peer answering
    others while it runs: a program holds at most 1 GiB at once, a pool of 2 workers
    runs programs at once, and the peer's own loop keeps a core's worth of time."""

    memory: int = GiB              # bytes live at once, whole program (program_memory)
    flops: float = 2e10            # floating-point operations, whole program (program_flops)
    seconds: float = 60.0          # wall clock of the real run (program_seconds)
    running: int = 2               # programs one caller may have running at once (programs_running)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (
                    isinstance(v, float) and not math.isfinite(v)):
                raise ValueError(f"program limit {f.name} must be a positive number, not {v!r}")


# profile key -> Limits field
CONFIG_KEYS = {"program_memory": "memory", "program_flops": "flops",
               "program_seconds": "seconds", "programs_running": "running"}


def limits_for(config, caller: str) -> Limits:
    """The limits `config` (a PeerConfig) sets for `caller`: the peer-wide keys
    (``program_memory``...), then ``program_limits[caller]`` (or ``["*"]``) over them.

    >>> from p2pgrid.config import PeerConfig
    >>> cfg = PeerConfig(name="h", data_dir="/tmp/h", program_seconds=5,
    ...                  program_limits={"ana": {"seconds": 600}})
    >>> limits_for(cfg, "ana").seconds, limits_for(cfg, "bob").seconds
    (600, 5)
    """
    base = Limits(**{field: getattr(config, key) for key, field in CONFIG_KEYS.items()
                     if getattr(config, key, None) is not None})
    table: Mapping[str, Any] = getattr(config, "program_limits", None) or {}
    override = table.get(caller, table.get("*"))
    if not override:
        return base
    known = {f.name for f in fields(Limits)}
    return replace(base, **{k: v for k, v in dict(override).items() if k in known})


def nbytes(value) -> int:
    """Bytes a value's own storage takes (0 for what is not a tensor)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


def _numel(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    return 1 if isinstance(value, (int, float)) else 0


# elementwise functions that cost several multiply-adds per element
_HEAVY = {"exp": 8, "log": 8, "log1p": 8, "sqrt": 4, "sigmoid": 10, "tanh": 10, "pow": 10,
          "softmax": 12, "var": 3, "std": 4, "histc": 4, "remainder": 4, "floordiv": 4,
          "div": 2, "cumsum": 2}
_VIEWS = {"getitem", "reshape", "flatten", "transpose", "t", "permute", "unsqueeze", "squeeze"}


def op_flops(name: str, args: list, out) -> float:
    """An upper estimate of the floating-point operations of one op."""
    if name == "matmul" and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args):
        k = args[0].shape[-1] if args[0].dim() else 1
        return 2.0 * max(_numel(out), 1) * k
    if name in _VIEWS:
        return float(_numel(out))   # a copy at most
    inputs = sum(_numel(a) for a in args)
    return float(_HEAVY.get(name, 1) * max(inputs, _numel(out)))


def scratch_bytes(name: str, args: list, out) -> int:
    """Memory an op holds only while it runs (upcasts, temporaries)."""
    if name in ("var", "std", "histc", "mean", "softmax") and args:
        return 2 * _numel(args[0]) * 8 if name in ("var", "std") else nbytes(args[0])
    return 0


class Meter:
    """Adds up one program's cost node by node and refuses it once over `limits`."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits
        self.flops = 0.0
        self.peak = 0
        self.constants = 0

    def base(self, live: int) -> None:
        """Memory held before the first node and throughout: the program's own constants."""
        self.constants = live
        self._check_memory(-1, "constants", live)

    def node(self, i: int, name: str, args: list, out, *, live: int) -> None:
        """Charge node `i`; `live` is what its values hold while it runs, its output included."""
        self.flops += op_flops(name, args, out)
        self._check_memory(i, name, self.constants + live + scratch_bytes(name, args, out))
        if self.limits is not None and self.flops > self.limits.flops:
            raise ComputeLimitExceeded(
                f"node {i} ({name}) brings the program to {self.flops:.0f} floating-point "
                f"operations; this peer allows {self.limits.flops:.0f} per program (program_flops)",
                limit="program_flops", allowed=self.limits.flops)

    def _check_memory(self, i: int, name: str, live: int) -> None:
        self.peak = max(self.peak, live)
        if self.limits is not None and live > self.limits.memory:
            where = "its constants" if i < 0 else f"node {i} ({name})"
            raise ComputeLimitExceeded(
                f"the program would hold {live} bytes at once at {where}; this peer allows "
                f"{self.limits.memory} per program (program_memory)",
                limit="program_memory", allowed=self.limits.memory)
