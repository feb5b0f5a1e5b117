"""Everything p2pgrid changes in the HTTP/2 stack it runs on, one module per library.

The peer serves with hypercorn and calls with httpx/httpcore, over h2 (with hpack and
hyperframe) on trio's TLS. Stock, those move a 256 MB tensor at a few MB/s and add
milliseconds to a small call, and hypercorn has a bug a hostile client can trigger. The
changes live here, one module per library they change, each listing in its docstring
what it works around upstream, what it changes and when it can go:

- :mod:`.hyperframe`: a DATA frame's cheap repr;
- :mod:`.hpack`: plain (non-Huffman) header literals;
- :mod:`.h2`: fewer copies of DATA each way, our window and frame settings;
- :mod:`.trio`: every TLS record already received per read, larger socket reads;
- :mod:`.hypercorn`: the safety fixes (DATA for a closed stream, a failing connection
  logged and counted, connections admitted by the peer's table) and the speed changes
  (one write per response, one idle timer per connection, bounded writes);
- :mod:`.httpcore`: one write per request, no body copies, a closed idle connection
  noticed before use, stream permits taken without a checkpoint.

Nothing is patched process-wide. Each change is a subclass or a wrapper that only the
peer's own objects use: :func:`p2pgrid.transport.hypercorn.serve` builds the server's
connections from its own classes, and :class:`p2pgrid.transport.httpcore.PeerHTTPTransport`
is the client's connection pool. Another hypercorn or httpx user in the same process
(a web console, a user's script) gets the libraries as released.

Before the first peer object is built, :mod:`p2pgrid.patchguard` checks each library's
version and every upstream symbol these classes override or call: :func:`tuned` says
whether the speed changes apply (a mismatch raises one line, or with
``P2PGRID_UNPATCHED=1`` warns and leaves them off: stock behaviour, slower), and
:func:`require_safety` guards the hypercorn fixes the server never runs without.
"""

from __future__ import annotations

from .. import patchguard

WINDOW = 32 * 1024 * 1024        # flow-control window, per stream and per connection
FRAME = 1 << 20                  # largest DATA frame either side sends (h2 allows up to 2**24-1)
# the ASGI scope extension where the peer's server puts a request's
# transport.hypercorn.Disconnect (the app registers cancel scopes with it)
DISCONNECT = "p2pgrid.disconnect"
SMALL = 64 * 1024                # response DATA up to this size waits in h2's buffer for the next flush

_tuned: bool | None = None
_safe = False


def tuned() -> bool:
    """Whether the peer's objects use the speed changes: checked once per process.

    Raises :class:`p2pgrid.patchguard.PatchMismatch` (one line) when a library is not the
    version, or a symbol not the shape, the changes were written for; with
    ``P2PGRID_UNPATCHED=1`` warns once and answers False instead."""
    global _tuned
    if _tuned is None:
        _tuned = patchguard.check(what="transport tuning (p2pgrid.transport)")
    return _tuned


def require_safety() -> None:
    """Check, once, what the server's and the client's fixes override (the Safe* classes
    of :mod:`.hypercorn` and :mod:`.httpcore`): these apply even with
    ``P2PGRID_UNPATCHED=1``, since the stock libraries are not correct for the peer."""
    global _safe
    if not _safe:
        patchguard.check_required(("hypercorn", "httpcore"), patchguard.SAFETY_PATHS,
                                  what="p2pgrid.transport's fixes")
        _safe = True


class FailureCount:
    """Connections that ended in an unexpected exception (each logged at ERROR with its
    traceback by :class:`p2pgrid.transport.hypercorn.SafeTCPServer`). The server's App
    holds one (``app.connection_failures``); the module's ``failures`` counts every
    server in the process."""

    def __init__(self) -> None:
        self.count = 0
        self.last: str | None = None  # the last exception's type name, for a status line

    def add(self, exc: BaseException) -> None:
        self.count += 1
        self.last = type(exc).__name__


failures = FailureCount()
