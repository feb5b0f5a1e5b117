"""hyperframe: a DATA frame whose repr does not hex-encode its payload.

- **Eager DATA frame repr.** h2 4.4.1 logs every received frame with
  ``logger.trace("Received frame: %s", repr(frame))`` (h2/connection.py,
  ``_receive_frame``): the repr is built even though nothing logs at trace level,
  and hyperframe 6.1.0's ``DataFrame._body_repr`` re-serialises and hex-encodes the
  payload for it, about 0.5 ms per 1 MB frame. :class:`LeanDataFrame` shows the
  length instead. No upstream issue found (searched python-hyper/h2 and hyperframe
  issues for "repr" and "trace"); the fix belongs in h2 (``%r`` instead of an eager
  ``repr()``, so that logging formats it only when enabled). Scope: only frames that
  :class:`p2pgrid.transport.h2.LeanFrameBuffer` parses become this class, i.e. the
  peer's own connections. Remove when h2 formats the frame lazily.
"""

from __future__ import annotations

from hyperframe.frame import DataFrame


class LeanDataFrame(DataFrame):
    """A DataFrame whose repr shows its payload's length, not its bytes."""

    def _body_repr(self) -> str:
        return f"<{len(self.data)} bytes>"
