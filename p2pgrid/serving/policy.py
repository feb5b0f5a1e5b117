"""What a served model accepts, from whom, how often: checked before any compute (sans-IO).

>>> p = Policy(input_shape=(None, 3), dtype="float32", value_range=(0, 1), max_batch=8,
...            rate_limit="2/s", users=["bob"])
>>> p.check_caller("bob"); p.check_meta(torch.zeros(4, 3))  # the batch size
4
>>> p.check_values(torch.full((4, 3), 2.0))
Traceback (most recent call last):
...
p2pgrid.errors.BadRequest: input values must lie in [0.0, 1.0]; got [2, 2]
>>> gate = Gate(p, clock=lambda: 0.0)
>>> gate.admit("bob"); gate.admit("bob")
>>> gate.admit("bob")
Traceback (most recent call last):
...
p2pgrid.errors.RateLimited: bob exceeded 2/s; retry in 0.5 s
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BadRequest, PermissionDenied, ShapeError
from ..ratelimit import Limiter, parse_rate

__all__ = ["Policy", "Gate", "parse_rate", "DTYPES"]

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool)}

@dataclass(frozen=True)
class Policy:
    """The owner's terms for remote inference; every host of the model enforces them.

    ``input_shape``: None for any size along a dimension (the first is the batch);
    ``value_range``: inclusive bounds; ``max_batch``: rows per call; ``rate_limit``:
    calls per user ('60/min', token bucket); ``quota``: input rows per user per period
    ('10000/day'); ``users``: who may call (None: anyone). The owner is always allowed.
    """

    input_shape: tuple | None = None
    dtype: str | None = None
    value_range: tuple[float, float] | None = None
    max_batch: int | None = None
    rate_limit: str | None = None
    quota: str | None = None
    users: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not 1 <= len(shape) <= 32 or not all(
                    d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                    for d in shape):
                raise BadRequest("policy input_shape: a tuple of non-negative ints or None")
            object.__setattr__(self, "input_shape", shape)
        if self.dtype is not None:
            name = str(self.dtype).removeprefix("torch.")
            if name not in DTYPES:
                raise BadRequest(f"policy dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
            object.__setattr__(self, "dtype", name)
        if self.value_range is not None:
            lo, hi = (float(v) for v in self.value_range)
            if not lo <= hi:
                raise BadRequest("policy value_range: (low, high) with low <= high")
            object.__setattr__(self, "value_range", (lo, hi))
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise BadRequest("policy max_batch: a positive int")
        for rate in (self.rate_limit, self.quota):
            if rate is not None:
                parse_rate(rate)
        if self.users is not None:
            if isinstance(self.users, str) or not all(isinstance(u, str) for u in self.users):
                raise BadRequest("policy users: a list of peer names (or None for anyone)")
            object.__setattr__(self, "users", tuple(self.users))

    # ------------------------------------------------------------ wire form

    def to_dict(self) -> dict:
        return {"input_shape": None if self.input_shape is None else list(self.input_shape),
                "dtype": self.dtype,
                "value_range": None if self.value_range is None else list(self.value_range),
                "max_batch": self.max_batch, "rate_limit": self.rate_limit, "quota": self.quota,
                "users": None if self.users is None else list(self.users)}

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        if not isinstance(d, dict) or set(d) - set(cls.__dataclass_fields__):
            raise BadRequest("policy: expected a map of Policy fields")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"policy: {e}") from None

    def summary(self) -> str:
        parts = []
        if self.input_shape is not None:
            parts.append("shape=(" + ",".join("N" if d is None else str(d) for d in self.input_shape) + ")")
        if self.dtype:
            parts.append(self.dtype)
        if self.value_range is not None:
            parts.append(f"range=[{self.value_range[0]:g},{self.value_range[1]:g}]")
        if self.max_batch is not None:
            parts.append(f"batch<={self.max_batch}")
        if self.rate_limit:
            parts.append(f"rate={self.rate_limit}")
        if self.quota:
            parts.append(f"quota={self.quota}")
        parts.append("users=" + ("*" if self.users is None else ",".join(self.users) or "-"))
        return " ".join(parts)

    # ------------------------------------------------------------ checks

    def allows(self, caller: str, owner: str | None = None) -> bool:
        return caller == owner or self.users is None or caller in self.users

    def check_caller(self, caller: str, owner: str | None = None, model: str = "this model") -> None:
        if not self.allows(caller, owner):
            raise PermissionDenied(f"{caller} is not on the list of users of {model}",
                                   model=model)

    def check_meta(self, x) -> int:
        """Type, dtype, shape and batch size (no reading of values); returns the batch size."""
        if not isinstance(x, torch.Tensor):
            raise BadRequest(f"the input must be a tensor, got {type(x).__name__}")
        if x.is_sparse or x.is_complex():
            raise BadRequest("the input must be a dense real tensor")
        if self.dtype is not None and str(x.dtype).removeprefix("torch.") != self.dtype:
            raise ShapeError(f"input dtype {str(x.dtype).removeprefix('torch.')} is not the "
                             f"policy's {self.dtype}", got=str(x.dtype).removeprefix("torch."),
                             want=self.dtype)
        if self.input_shape is not None:
            want = self.input_shape
            if x.dim() != len(want) or any(w is not None and w != g for w, g in zip(want, x.shape)):
                shown = "(" + ", ".join("N" if d is None else str(d) for d in want) + ")"
                raise ShapeError(f"input shape {tuple(x.shape)} does not fit {shown}",
                                 got=list(x.shape))
        batch = int(x.shape[0]) if x.dim() else 1
        if self.max_batch is not None and batch > self.max_batch:
            raise BadRequest(f"batch of {batch} exceeds the limit of {self.max_batch}",
                             batch=batch, max_batch=self.max_batch)
        return batch

    def check_values(self, x: torch.Tensor) -> None:
        """Finite values inside value_range. Reads the tensor: call in a worker thread for big ones."""
        if x.numel() == 0:
            return
        if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
            raise BadRequest("input holds NaN or infinite values")
        if self.value_range is not None:
            lo, hi = self.value_range
            mn, mx = float(x.min()), float(x.max())
            if mn < lo or mx > hi:
                raise BadRequest(f"input values must lie in [{lo}, {hi}]; got [{mn:g}, {mx:g}]")


class Gate(Limiter):
    """The policy's rate limit and quota for one served model on one host: each host
    enforces the policy on its own, so a user spreading calls over k hosts is bounded
    by k times the limit."""

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic):
        super().__init__(policy.rate_limit, policy.quota, clock=clock)
        self.policy = policy
