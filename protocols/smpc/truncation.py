"""Fixed-point truncation of shared values: divide by 2^bits after a product.

Two protocols, chosen by ``SmpcConfig.truncation`` (``auto``: local for 2 parties,
dealer-assisted for 3+):

**local** (SecureML, Mohassel-Zhang 2017; 2 parties only, 0 rounds). Party 0 keeps
``(x0 + 2^(bits-1)) >> bits``, party 1 keeps ``-((-x1) >> bits)``. For |x| < 2^k the
result is within 1 unit of round(x / 2^bits) except with probability <= 2^(k+1-64)
per element, when it is wrong by about 2^(64-bits) (e.g. k = 40: 2^-23).

**dealer** (any n, 1 round, no failure inside the range). The dealer deals shares of a
uniform r, of r_hi = r >> bits (unsigned) and of r_msb = bit 63 of r. Parties open
c = x + 2^62 + 2^(bits-1) + r. With x' = x + 2^62 + 2^(bits-1) in [0, 2^63), the sum
x' + r wraps past 2^64 exactly when r_msb = 1 and c's top bit is 0, so the wrap bit
w = (1 - msb(c)) * r_msb is linear in the shares, and

    x' >> bits = (c >> bits) - r_hi + w * 2^(64-bits) - borrow,  borrow in {0, 1}.

Subtracting 2^(62-bits) gives round(x / 2^bits) minus at most 1: the result is within
1.5 units (2^-f each) of x / 2^bits, for every x with |x| < 2^62 - 2^bits. The opened c
is uniform (masked by r), so it reveals nothing about x.
"""

from __future__ import annotations

from p2pgrid.errors import BadRequest

from .messages import Request
from .ring import RING_BITS, logical_rshift, msb
from .runtime import PartyContext, Protocol, open_ring
from .sharing import Shared

__all__ = ["truncate", "truncation_mode", "TRUNC_RANGE_BITS"]

TRUNC_RANGE_BITS = 62  # dealer truncation is correct for |x| < 2^62 - 2^bits


def truncation_mode(ctx: PartyContext) -> str:
    mode = ctx.config.truncation
    if mode == "auto":
        return "local" if ctx.n_parties == 2 else "dealer"
    if mode == "local" and ctx.n_parties != 2:
        raise BadRequest("local (SecureML) truncation is only correct for 2 parties; "
                         "use truncation='dealer' or 'auto'")
    return mode


def truncate(ctx: PartyContext, x: Shared, bits: int | None = None) -> Protocol[Shared]:
    """Divide a shared value by 2^bits (default: frac_bits); result scale drops by `bits`."""
    ctx.check_shared(x, "truncate")
    bits = ctx.config.frac_bits if bits is None else bits
    if not isinstance(bits, int) or not 0 <= bits <= min(x.scale, 61):
        raise BadRequest(f"cannot truncate {bits} bits from a value with {x.scale} fractional bits")
    if bits == 0:
        return x
    if truncation_mode(ctx) == "local":
        s = x.share
        if ctx.party == 0:
            out = (s + (1 << (bits - 1))) >> bits
        else:
            out = -((-s) >> bits)
        return x.like(out, x.scale - bits)
    pair = ctx.pre.take(Request("trunc_pair", (tuple(x.shape),), bits))
    masked = x.share + pair["r"]
    if ctx.party == 0:
        masked = masked + ((1 << TRUNC_RANGE_BITS) + (1 << (bits - 1)))
    c = (yield from open_ring(ctx, "trunc/open", {"c": masked}))["c"]
    wrap = (1 - msb(c)) * pair["r_msb"]
    out = (wrap << (RING_BITS - bits)) - pair["r_hi"]
    if ctx.party == 0:
        out = out + logical_rshift(c, bits) - (1 << (TRUNC_RANGE_BITS - bits))
    return x.like(out, x.scale - bits)
