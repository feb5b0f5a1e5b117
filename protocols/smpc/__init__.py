"""SMPC core, sans-IO: fixed point in Z_2^64, additive sharing, a dealer interface,
Beaver multiplication/matmul, truncation, comparison/ReLU/max/argmax.

Threat model: semi-honest (honest-but-curious) parties, any number n >= 2, of which
any n-1 may collude; a semi-honest dealer (crypto provider) that colludes with no
party and never sees data or shares of data. No protection against malicious
deviation (no MACs) in these ops: a cheating party can change results undetected.
:mod:`.mac` holds the actively secure (MAC-checked, SPDZ2k-style) variants and
:mod:`.modes` runs one program in either mode (``security="semi-honest" | "active"``).

Each multi-round op is a generator per party (``yield Round``, resume with the
inbox); see :mod:`.runtime` for the shape and :mod:`.messages` for the wire types,
and :func:`run_parties` for the in-memory harness.

    from p2pgrid.protocols import smpc
    res = smpc.run_parties(2, lambda ctx: smpc.relu(ctx, ctx.wrap(my_shares[ctx.party])))
"""

from . import autograd, beaver, compare, mac, modes, truncation
from .beaver import div_public, matmul, mean, mul, scale_public
from .compare import (CMP_RANGE_BITS, CMP_ROUNDS, argmax, ge, ge_zero, gt, is_negative, le,
                      lt, max, max_with_index, relu)
from .dealer import Dealer, LocalDealer
from .fixedpoint import DEFAULT_FRAC_BITS, FixedPoint
from .harness import RunResult, RunStats, make_contexts, plan_requests, run_parties
from .messages import Inbox, Material, Request, Round, RoundMessage
from .preprocessing import DealerFeed, MaterialQueue, Preprocessing
from .prg import Prg, new_seed
from .runtime import (PartyContext, Protocol, SmpcConfig, input_shares, open_ring, parallel,
                      reveal, reveal_to)
from .sharing import Shared, cat, reconstruct, reconstruct_float, share, share_float, stack
from .truncation import truncate

__all__ = [
    # encoding / sharing
    "FixedPoint", "DEFAULT_FRAC_BITS", "Shared", "share", "reconstruct", "share_float",
    "reconstruct_float", "cat", "stack", "Prg", "new_seed",
    # dealer
    "Dealer", "LocalDealer", "Preprocessing", "DealerFeed", "MaterialQueue", "Request",
    "Material", "plan_requests",
    # runtime / messages / harness
    "PartyContext", "SmpcConfig", "Protocol", "Round", "Inbox", "RoundMessage", "parallel",
    "open_ring", "reveal", "reveal_to", "input_shares", "run_parties", "make_contexts",
    "RunResult", "RunStats",
    # ops
    "mul", "matmul", "mean", "div_public", "scale_public", "truncate",
    "is_negative", "ge_zero", "ge", "gt", "le", "lt", "relu", "max", "argmax", "max_with_index",
    "CMP_RANGE_BITS", "CMP_ROUNDS", "autograd", "beaver", "compare", "truncation", "mac",
    "modes",
]
