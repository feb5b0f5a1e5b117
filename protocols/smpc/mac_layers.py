"""Authenticated layer steps: masks reused between a layer's passes, truncate-and-mask.

Built on :mod:`.mac` (the same checked openings, the same dealer interface):

* :func:`linear_forward` / :func:`linear_backward`: a layer's product x W and, in the
  backward pass, x^T g and g W^T from one dealt item (A, B, G, C = AB, D = A^T G,
  E = G B^T), so the backward pass opens only g - G, as semi-honest training does;
* :func:`truncmul`: trunc(x) * bit for an authenticated 0/1 bit in one round (a ReLU's
  backward pass on a raw gradient).
"""

from __future__ import annotations

import numpy as np

from p2pgrid.errors import BadRequest, ProtocolError

from . import ring128 as R
from .dealer import linear_param, linear_params
from .mac import K, ActiveParty, AuthShared, open_values

__all__ = ["linear_values", "linear_forward", "linear_backward", "truncmul_values", "truncmul"]


def linear_values(xs, ws, param: int, uniform=R.uniform) -> dict[str, np.ndarray]:
    """A layer's masks, reused between its passes: A (for x), B (for W), C = A B and, for
    training (:func:`.dealer.linear_param`), G (for the output gradient), D = A^T G and,
    if the input gradient is wanted, E = G B^T. `uniform(name, shape)` draws the uniform ones
    (:func:`.ring128.uniform`; the network dealer's from the parties' seeds)."""
    (m, k), (k2, n) = tuple(xs), tuple(ws)
    if k != k2:
        raise BadRequest(f"shapes {list(xs)} and {list(ws)} do not fit a matrix product")
    train, grad_x = linear_params(param)
    a, b = uniform("A", (m, k)), uniform("B", (k, n))
    out = {"A": a, "B": b, "C": R.matmul(a, b)}
    if train:
        g = uniform("G", (m, n))
        out.update(G=g, D=R.matmul(R.apply(a, np.transpose), g))
        if grad_x:
            out["E"] = R.matmul(g, R.apply(b, np.transpose))
    return out


def _t(x: AuthShared) -> AuthShared:
    return x.moved(np.transpose)


def linear_forward(ctx: ActiveParty, x: AuthShared, w: AuthShared, *, train: bool = False,
                   grad_x: bool = True):
    """x @ w (2-D, no truncation) with a dealt layer item; one round. With `train`, returns
    also what :func:`linear_backward` needs (the openings and the item): the backward
    pass then opens only the output gradient, as semi-honest training does. `grad_x`
    (training): the backward pass will want x's gradient (not for a first layer)."""
    m = ctx.material("linear", x.shape, w.shape, linear_param(train, grad_x))
    a, b, c = ctx.auth(m["A"]), ctx.auth(m["B"]), ctx.auth(m["C"])
    o = yield from open_values(ctx, "a/linear", {"eps": ctx.sub(x, a), "delta": ctx.sub(w, b)})
    eps, delta = o["eps"], o["delta"]
    # x w = C + eps B + A delta + eps delta = C + eps (B + delta) + A delta (as mac.matmul)
    z = ctx.add(c, ctx.add(ctx.matmul_public(ctx.add_public(b, delta), eps, left=True),
                           ctx.matmul_public(a, delta)))
    z.scale = x.scale + w.scale
    saved = (eps, delta, a, b, ctx.auth(m["G"]), ctx.auth(m["D"]),
             ctx.auth(m["E"]) if "E" in m else None) if train else None
    return z, saved


def linear_backward(ctx: ActiveParty, g: AuthShared, saved, *, grad_x: bool = True):
    """(x^T g, g w^T) from the forward pass's openings and the output gradient g; one
    round (opens g - G). Neither product is truncated (scales add)."""
    eps, delta, a, b, gm, d, e = saved
    o = yield from open_values(ctx, "a/linear/back", {"gamma": ctx.sub(g, gm)})
    gamma = o["gamma"]
    eps_t = R.apply(eps, np.transpose)
    # x^T g = D + eps^T G + A^T gamma + eps^T gamma = D + eps^T (G + gamma) + A^T gamma
    dw = ctx.add(d, ctx.add(ctx.matmul_public(ctx.add_public(gm, gamma), eps_t, left=True),
                            ctx.matmul_public(_t(a), gamma)))
    dw.scale = g.scale + a.scale
    if not grad_x:
        return dw, None
    if e is None:
        raise ProtocolError("this layer's item was dealt without the input gradient's mask")
    delta_t = R.apply(delta, np.transpose)
    # g w^T = E + gamma B^T + G delta^T + gamma delta^T = E + (G + gamma) delta^T + gamma B^T
    gx = ctx.add(e, ctx.add(ctx.matmul_public(_t(b), gamma, left=True),
                            ctx.matmul_public(ctx.add_public(gm, gamma), delta_t)))
    gx.scale = g.scale + b.scale
    return dw, gx


def truncmul_values(shape, bits: int, uniform=R.uniform) -> dict[str, np.ndarray]:
    """A truncation pair (r, r_lo >> bits, msb r_lo) with a multiplication mask b for a bit
    and the products r_hi b, r_msb b (see :func:`truncmul`)."""
    if not 0 < bits < K - 1:
        raise BadRequest("truncation bits out of range")
    r, b = uniform("r", shape), uniform("b", shape)
    r_hi = R.from_u64(r[0] >> np.uint64(bits))
    r_msb = R.from_u64(r[0] >> np.uint64(K - 1))
    return {"r": r, "r_hi": r_hi, "r_msb": r_msb, "b": b, "r_hi_b": R.mul(r_hi, b),
            "r_msb_b": R.mul(r_msb, b)}


def truncmul(ctx: ActiveParty, x: AuthShared, bit: AuthShared, bits: int):
    """trunc(x, bits) * bit for an authenticated 0/1 `bit`, in one round (the truncation
    and the product side by side; a ReLU's backward pass on a raw gradient).

    Opens c = x + 2^(k-2) + r (as :func:`truncate`) and e = bit - b. With P = (c >> bits)
    - (2^(k-2) >> bits) and q = 2^(k-bits) (1 - msb c), trunc(x) = P - [r_hi] + q [r_msb],
    so trunc(x) bit = P [bit] - e [r_hi] - [r_hi b] + q (e [r_msb] + [r_msb b]): linear in
    dealt authenticated values once c and e are public."""
    if x.shape != bit.shape:
        raise BadRequest("truncmul needs operands of one shape")
    m = ctx.material("truncmul", x.shape, bits)
    r, r_hi, r_msb, b, r_hi_b, r_msb_b = (ctx.auth(m[k]) for k in
                                          ("r", "r_hi", "r_msb", "b", "r_hi_b", "r_msb_b"))
    off = 1 << (K - 2)
    o = yield from open_values(ctx, "a/truncmul", {"c": ctx.add_public(ctx.add(x, r), off),
                                                    "e": ctx.sub(bit, b)})
    c, e = o["c"][0], o["e"]
    with np.errstate(over="ignore"):
        p = R.from_u64((c >> np.uint64(bits)) - np.uint64(off >> bits))
    q = R.mul_int(R.from_u64(np.uint64(1) - (c >> np.uint64(K - 1))), 1 << (K - bits))
    z = ctx.sub(ctx.mul_public(bit, p), ctx.add(ctx.mul_public(r_hi, e), r_hi_b))
    z = ctx.add(z, ctx.mul_public(ctx.add(ctx.mul_public(r_msb, e), r_msb_b), q))
    z.scale = x.scale - bits
    return z
