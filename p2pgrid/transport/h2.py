"""h2: DATA frames copied once each way, and our window and frame-size settings.

- **Four copies per sent DATA frame.** h2 4.4.1's ``H2Connection._prepare_for_sending``
  serialises frames with hyperframe (``memoryview.tobytes``, a body join, header +
  body) and ``data_to_send()`` returns ``bytes(self._data_to_send)``, one more copy of
  everything queued; with 1 MB frames that is most of a bulk transfer's CPU.
  :class:`LeanH2Connection` writes an unpadded DATA frame's 9-byte header and its payload
  straight into the outgoing buffer and hands that buffer over without copying it (both
  callers, hypercorn's ``_flush`` and httpcore's ``_write_outgoing_data``, only test it
  for emptiness and send it). Same bytes on the wire.
- **Two copies per received frame.** ``FrameBuffer.__next__`` slices the frame's body
  out of its buffer (a copy of up to a whole frame) before the frame's ``parse_body``
  copies it again; :class:`LeanFrameBuffer` parses from a view of the buffer. It also
  turns DATA frames into :class:`p2pgrid.transport.hyperframe.LeanDataFrame`.
- **64 KiB windows and 16 KiB frames** (RFC 9113 defaults, which h2 keeps unless told):
  a WINDOW_UPDATE round trip per 64 KiB and a trip through Python per 16 KiB.
  :func:`settings` gives 32 MiB windows and 1 MiB frames; the servers and clients of
  this package announce them. A configuration, not a bug.

No upstream issue for the copies (h2's issues about performance are about the state
machine); they would be upstream improvements, not fixes. Scope: only connections
created as :class:`LeanH2Connection` (the peer's hypercorn protocol and httpcore
connection classes) behave differently. Remove a part when h2 stops making that copy
(check ``_prepare_for_sending``, ``data_to_send`` and ``FrameBuffer.__next__`` after an
upgrade: patchguard fails on any change of their shape).
"""

from __future__ import annotations

import struct

import h2.connection
import h2.frame_buffer
import h2.settings
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame

from . import FRAME, WINDOW
from .hyperframe import LeanDataFrame

_FRAME_HEADER = struct.Struct(">HBBBL")  # RFC 9113 4.1: 24-bit length, type, flags, stream id
_END_STREAM = 0x01


class LeanFrameBuffer(h2.frame_buffer.FrameBuffer):
    """Parses each frame's body from a view of the receive buffer, not from a copy."""

    def __next__(self):
        data = self._data
        if len(data) < 9:
            raise StopIteration
        try:
            f, length = Frame.parse_frame_header(memoryview(data)[:9])
        except (InvalidDataError, InvalidFrameError) as err:  # pragma: no cover
            raise h2.frame_buffer.ProtocolError(
                f"Received frame with invalid header: {err!s}") from err
        if len(data) < length + 9:
            raise StopIteration
        self._validate_frame_length(length)
        if type(f) is DataFrame:
            f.__class__ = LeanDataFrame  # same fields, cheap repr (see .hyperframe)
        with memoryview(data) as view, view[9:9 + length] as body:
            try:
                f.parse_body(body)  # every frame type copies what it keeps (tobytes, ints)
            except InvalidDataError as err:
                raise h2.frame_buffer.ProtocolError("Received frame with non-compliant data") from err
            except InvalidFrameError as err:
                raise h2.frame_buffer.FrameDataMissingError("Frame data missing or invalid") from err
        del data[:9 + length]  # views released: the bytearray may shrink in place
        new_frame = self._update_header_buffer(f)
        return new_frame if new_frame is not None else self.__next__()


class LeanH2Connection(h2.connection.H2Connection):
    """An H2Connection that copies a DATA frame's payload once on its way out and
    once on its way in."""

    def __init__(self, config=None) -> None:
        super().__init__(config=config)
        self.incoming_buffer = LeanFrameBuffer(server=not self.config.client_side)
        # h2 dispatches received frames on their exact class
        self._frame_dispatch_table[LeanDataFrame] = self._frame_dispatch_table[DataFrame]

    def _prepare_for_sending(self, frames) -> None:
        buf = self._data_to_send
        limit = self.max_outbound_frame_size
        for f in frames:
            if type(f) is DataFrame and "PADDED" not in f.flags and len(f.data) > 1024:
                n = len(f.data)
                flags = _END_STREAM if "END_STREAM" in f.flags else 0
                buf += _FRAME_HEADER.pack(n >> 8, n & 0xFF, 0x0, flags, f.stream_id)
                buf += f.data
                f.body_len = n
            else:
                buf += f.serialize()
            assert f.body_len <= limit

    def data_to_send(self, amount=None):
        """What is queued, handed over as the buffer itself (h2 starts a new one)."""
        if amount is None:
            data, self._data_to_send = self._data_to_send, bytearray()
            return data
        return super().data_to_send(amount)


def settings(*, client: bool, max_streams: int, max_header_list: int, **extra) -> h2.settings.Settings:
    """Local settings announcing our window and frame size (`extra`: more SettingCodes
    names and values, e.g. ``ENABLE_PUSH=0``)."""
    codes = h2.settings.SettingCodes
    values = {codes.MAX_CONCURRENT_STREAMS: max_streams,
              codes.MAX_HEADER_LIST_SIZE: max_header_list,
              codes.INITIAL_WINDOW_SIZE: WINDOW,
              codes.MAX_FRAME_SIZE: FRAME}
    values.update({getattr(codes, k): v for k, v in extra.items()})
    return h2.settings.Settings(client=client, initial_values=values)
