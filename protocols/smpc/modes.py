"""One program, either security mode: the per-session switch of the in-memory harness.

``run_program(n, program, security="semi-honest" | "active")`` runs ``program(ops)`` for
every party, where `ops` offers the same fixed-point operations in both modes:
``input``, ``mul``, ``matmul`` (each truncated back to f fractional bits), ``relu``,
``max``, ``argmax`` and ``reveal``. In ``"active"`` mode they are the MAC-checked ones of :mod:`.mac` (a
deviating party makes every honest party raise CheatingDetected); in ``"semi-honest"``
mode, the plain ones (dealer truncation, so both modes use dealt truncation pairs).
Network sessions (p2pgrid.smpc) take the same switch per group (``security=`` on
``net.share``, ``pointer.share``, ``net.encrypt_model``).
"""

from __future__ import annotations

from typing import Any, Callable

from p2pgrid.errors import BadRequest

from . import beaver, compare, mac, mac_compare
from .harness import run_parties
from .runtime import SmpcConfig, input_shares, reveal

__all__ = ["SECURITY_MODES", "run_program", "SemiHonestOps", "ActiveOps"]

SECURITY_MODES = ("semi-honest", "active")


class SemiHonestOps:
    def __init__(self, ctx):
        self.ctx, self.party, self.n_parties = ctx, ctx.party, ctx.n_parties

    def input(self, owner, value, shape):
        return input_shares(self.ctx, owner, value, shape)

    def mul(self, x, y):
        return beaver.mul(self.ctx, x, y)

    def matmul(self, x, y):
        return beaver.matmul(self.ctx, x, y)

    def relu(self, x):
        return compare.relu(self.ctx, x)

    def max(self, x, dim=-1):
        return compare.max(self.ctx, x, dim)

    def argmax(self, x, dim=-1, one_hot=True):
        return compare.argmax(self.ctx, x, dim, one_hot=one_hot)

    def reveal(self, *xs):
        out = []
        for x in xs:
            out.append((yield from reveal(self.ctx, x)))
        return out


class ActiveOps:
    def __init__(self, ctx: mac.ActiveParty):
        self.ctx, self.party, self.n_parties = ctx, ctx.party, ctx.n_parties

    def input(self, owner, value, shape):
        return mac.input_value(self.ctx, owner, value, shape)

    def mul(self, x, y):
        return (yield from mac.truncate(self.ctx, (yield from mac.mul(self.ctx, x, y))))

    def matmul(self, x, y):
        return (yield from mac.truncate(self.ctx, (yield from mac.matmul(self.ctx, x, y))))

    def relu(self, x):
        out, _ = yield from mac_compare.relu(self.ctx, x)
        return out

    def max(self, x, dim=-1):
        return mac_compare.max(self.ctx, x, dim)

    def argmax(self, x, dim=-1, one_hot=True):
        return mac_compare.argmax(self.ctx, x, dim, one_hot=one_hot)

    def reveal(self, *xs):
        return mac.reveal(self.ctx, *xs)


def run_program(n_parties: int, program: Callable[[Any], Any], *,
                security: str = "semi-honest", session: str = "session", **kw):
    """Run `program(ops)` on every party in memory in the chosen security mode."""
    if security not in SECURITY_MODES:
        raise BadRequest(f"security must be one of {SECURITY_MODES}, not {security!r}")
    if security == "active":
        return mac.run_active(n_parties, lambda ctx: program(ActiveOps(ctx)), session=session,
                              **kw)
    config = kw.pop("config", None) or SmpcConfig(truncation="dealer")
    return run_parties(n_parties, lambda ctx: program(SemiHonestOps(ctx)), config=config, **kw)
