"""Model serving (issue 5): public, private and replicated serving of whitelisted models.

A model travels as a :mod:`p2pgrid.modelgraph` spec in a package file (see
:mod:`.package`), announced in the gossip directory with its terms and hosts.

    await net.serve_model(model, "digits", policy=Policy(input_shape=(None, 1, 28, 28),
                          dtype="float32", value_range=(0, 1), users=["bob"]), replicas=2)
    y = await net.run_inference("digits", x)        # on the host expected to answer first
    lm = await net.download_model("tiny-gpt")       # checked chunk by chunk and by hash

Modules: ``policy`` (input checks, rate limits, quotas), ``package`` (the model on disk),
``transfer`` (chunked, resumable upload and download), ``routing`` (replica choice),
``catalog`` (what the directory announces), ``host`` (a peer's served models and the
handlers), ``owner`` and ``client`` (the two ends), ``encrypted`` (on p2pgrid.smpc),
``api`` (Network methods), ``cli`` (``p2pgrid models``), ``gpt``. See docs/SERVING.md.
"""

from __future__ import annotations

import logging

import trio

from ..lazy import lazy_exports
from .cli import add_cli

__all__ = ["Policy", "HostingPolicy", "Terms", "ModelInfo", "NetworkAPI", "router", "service",
           "add_cli"]

log = logging.getLogger("p2pgrid.serving")

# Loaded on first use: ``p2pgrid --help`` imports this package for its ``cli`` submodule,
# and must not pay for torch and the network stack.
_LAZY = {"NetworkAPI": ".api", "ModelInfo": ".catalog", "HostingPolicy": ".host", "Terms": ".host",
         "router": ".host", "state": ".host", "Policy": ".policy"}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


async def service(peer, task_status=trio.TASK_STATUS_IGNORED):
    """Announce this peer's hosting consent, serve again what it served before, then
    keep the replicas of its own models placed."""
    from . import owner
    from .host import state

    s = state(peer)
    s.load_hosting()
    s.announce()
    task_status.started()
    try:
        await s.load()
    except Exception:  # never take the peer down over a model
        log.exception("could not restore served models")
        s.loaded.set()
    await owner.keep_replicas(s)
