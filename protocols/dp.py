"""Differential privacy: clipping, Gaussian noise and an RDP accountant.

Client-level DP-FedAvg (McMahan et al. 2018) clips each peer's update to an L2
norm of at most ``clip``, sums, and adds N(0, (noise_multiplier * clip)^2) to the
sum; DP-SGD (Abadi et al. 2016) does the same per example inside local training.
Both are the sampled Gaussian mechanism, whose privacy loss :class:`RDPAccountant`
tracks in Rényi DP (Mironov 2017; Mironov, Talwar & Zhang 2019), the analysis
Opacus and TF Privacy use, and converts to (epsilon, delta).

>>> acc = RDPAccountant()
>>> acc.step(noise_multiplier=1.0, sample_rate=1.0)
>>> round(acc.epsilon(1e-5, conversion="classic"), 2)  # one plain Gaussian release
5.3
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from p2pgrid.errors import BadRequest

from .private_random import PrivateRandom

__all__ = ["clip_update", "add_gaussian_noise", "global_norm", "RDPAccountant",
           "DEFAULT_ORDERS", "rdp_sampled_gaussian", "rdp_to_epsilon", "rdp_curve"]

#: The orders Opacus uses by default: 1.1, 1.2, ..., 10.9 and 12, ..., 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


# ------------------------------------------------------------------ clipping and noise

def global_norm(tensors: dict[str, torch.Tensor]) -> float:
    """L2 norm of all floating-point tensors of a dict taken as one vector."""
    floats = [t.detach().double().flatten() for t in tensors.values() if t.is_floating_point()]
    if not floats:
        return 0.0
    return float(torch.linalg.vector_norm(torch.cat(floats)))


def clip_update(delta: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale `delta` so its global L2 norm is at most `clip`; return (clipped, norm before).

    Only floating-point tensors are scaled; integer buffers pass through unchanged
    (a DP pipeline should leave them out of the update altogether).
    """
    if not clip > 0 or not math.isfinite(clip):
        raise BadRequest(f"clip must be a positive number, got {clip!r}")
    norm = global_norm(delta)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (v * scale).to(v.dtype) if v.is_floating_point() else v for k, v in delta.items()}, norm


def add_gaussian_noise(sum_update: dict[str, torch.Tensor], clip: float,
                       noise_multiplier: float) -> dict[str, torch.Tensor]:
    """Return `sum_update` + N(0, (noise_multiplier * clip)^2) on every float coordinate,
    the noise drawn from a :class:`~p2pgrid.protocols.private_random.PrivateRandom` (no seed can
    reproduce it)."""
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise BadRequest(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    std = float(noise_multiplier) * float(clip)
    rand = PrivateRandom()
    out = {}
    for k, v in sum_update.items():
        if v.is_floating_point() and std > 0:
            noise = rand.normal(v.shape, std)
            out[k] = (v.double() + noise).to(v.dtype)
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------ RDP of the sampled Gaussian

def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    if a < b:
        raise ValueError("log_sub of a larger number")
    return a + math.log1p(-math.exp(b - a))


def _log_erfc(x: float) -> float:
    r = math.erfc(x)
    if r > 0.0:
        return math.log(r)
    # asymptotic expansion for large x, where erfc underflows
    return (-math.log(math.pi) / 2 - math.log(x) - x ** 2 - 0.5 * x ** -2 + 0.625 * x ** -4
            - 37.0 / 24.0 * x ** -6 + 353.0 / 64.0 * x ** -8)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = (math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)
                    + i * math.log(q) + (alpha - i) * math.log1p(-q))
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma ** 2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    # Mironov, Talwar & Zhang (2019), section 3.3: two converging series.
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    coef, i = 1.0, 0  # coef = binom(alpha, i), built by recurrence (it changes sign)
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma ** 2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma ** 2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30 or i > 10_000:
            break
        coef *= (alpha - i + 1) / i
    return _log_add(log_a0, log_a1)


def rdp_sampled_gaussian(noise_multiplier: float, sample_rate: float, order: float) -> float:
    """RDP at `order` of one step of the Poisson-sampled Gaussian mechanism."""
    q, sigma, alpha = float(sample_rate), float(noise_multiplier), float(order)
    if not 0 <= q <= 1:
        raise BadRequest(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if not alpha > 1:
        raise BadRequest(f"RDP orders must be > 1, got {order!r}")
    if q == 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma ** 2)
    if math.isinf(alpha):
        return math.inf
    if alpha.is_integer():
        return _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_frac(q, sigma, alpha) / (alpha - 1)


def rdp_curve(noise_multiplier: float, sample_rate: float, steps: int = 1,
              orders: Sequence[float] = DEFAULT_ORDERS) -> list[float]:
    """RDP at every order of `steps` sampled-Gaussian steps (what one release costs).

    Curves of different mechanisms that each bound the same release can be combined
    order by order with ``min``; curves of successive releases compose by ``+``.
    """
    if steps < 0:
        raise BadRequest("steps must be >= 0")
    return [steps * rdp_sampled_gaussian(noise_multiplier, sample_rate, a) for a in orders]


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float,
                   conversion: str = "balle2020") -> tuple[float, float]:
    """Best (epsilon, order) for `delta` from an RDP curve.

    ``"classic"`` is Mironov (2017), Prop. 3: eps = rdp - log(delta) / (alpha - 1),
    as in Abadi et al.'s moments accountant and early TF Privacy. ``"balle2020"``
    is the tighter conversion of Balle et al. (2020), Thm. 21, which Opacus uses.
    """
    if not 0 < delta < 1:
        raise BadRequest(f"delta must be in (0, 1), got {delta!r}")
    if conversion not in ("classic", "balle2020"):
        raise BadRequest(f"unknown conversion {conversion!r}")
    if all(r == 0 for r in rdp):  # nothing released (the formulas' grid would say a little > 0)
        return 0.0, math.inf
    best = (math.inf, math.nan)
    for a, r in zip(orders, rdp):
        if conversion == "classic":
            eps = r - math.log(delta) / (a - 1)
        else:
            eps = r - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        if not math.isnan(eps) and eps < best[0]:
            best = (max(eps, 0.0), a)
    return best


class RDPAccountant:
    """Composes sampled-Gaussian steps in RDP; ask it for epsilon at any delta.

    >>> acc = RDPAccountant()
    >>> acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, steps=60 * 234)
    >>> 2.5 < acc.epsilon(1e-5) < 3.0
    True
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS):
        self.orders = tuple(float(a) for a in orders)
        self._rdp = [0.0] * len(self.orders)
        self.history: list[tuple[float, float, int]] = []

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if steps < 0:
            raise BadRequest("steps must be >= 0")
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        for k, a in enumerate(self.orders):
            self._rdp[k] += steps * rdp_sampled_gaussian(noise_multiplier, sample_rate, a)

    def add_rdp(self, curve: Sequence[float]) -> None:
        """Compose a release given by its RDP curve over this accountant's orders."""
        if len(curve) != len(self.orders) or any(not r >= 0 for r in curve):
            raise BadRequest("an RDP curve needs one non-negative value per order")
        self._rdp = [a + float(b) for a, b in zip(self._rdp, curve)]

    @property
    def rdp(self) -> list[float]:
        return list(self._rdp)

    def get_privacy_spent(self, delta: float, conversion: str = "balle2020") -> tuple[float, float]:
        """(epsilon, the order that attains it)."""
        return rdp_to_epsilon(self.orders, self._rdp, delta, conversion)

    def epsilon(self, delta: float, conversion: str = "balle2020") -> float:
        return self.get_privacy_spent(delta, conversion)[0]
