"""HTTP/2 flow-control settings for bulk tensors, applied to hypercorn and httpcore.

Both libraries start every connection with h2's defaults: 64 KiB stream windows
and 16 KiB frames. On a fast link that caps a 32 MB body at a few MB/s, because
each 64 KiB needs a WINDOW_UPDATE round trip and each 16 KiB frame is a trip
through Python. Neither library exposes these settings, so we re-create the
settings object they build at connection start (before the preface is sent),
with larger values. Idempotent; call :func:`apply` once per process.
"""

from __future__ import annotations

import h2.settings

WINDOW = 32 * 1024 * 1024        # per stream and per connection
FRAME = 1024 * 1024 - 1          # largest DATA frame we accept (h2 allows up to 2**24-1)

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _tune_hypercorn()
    _tune_httpcore()
    _cheap_frame_repr()
    _applied = True


def _cheap_frame_repr() -> None:
    # h2 logs every received frame with an eager repr(frame), and a DATA frame's
    # repr re-serialises and hex-encodes its payload: ~0.5 ms per 1 MB frame,
    # for a log line nobody reads. Show the length instead.
    from hyperframe.frame import DataFrame

    DataFrame._body_repr = lambda self: f"<{len(self.data)} bytes>"


def _tune_hypercorn() -> None:
    from hypercorn.protocol import h2 as hh2
    from hypercorn.trio import tcp_server

    tcp_server.MAX_RECV = FRAME + 1  # read a whole frame per syscall, not 64 KiB

    original_init = hh2.H2Protocol.__init__
    original_initiate = hh2.H2Protocol.initiate

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        old = self.connection.local_settings
        self.connection.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: old.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: old.max_header_list_size,
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME,
        })
        # h2 reads these from local_settings only in its constructor, and a
        # replaced settings object produces no "changed" event on ACK
        self.connection.max_inbound_frame_size = FRAME

    async def initiate(self, headers=None, settings=None):
        await original_initiate(self, headers, settings)
        self.connection.increment_flow_control_window(WINDOW)
        await self._flush()

    hh2.H2Protocol.__init__ = __init__
    hh2.H2Protocol.initiate = initiate


def _tune_httpcore() -> None:
    from httpcore._async import http2 as ch2

    async def _send_connection_init(self, request):
        self._h2_state.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME,
        })
        del self._h2_state.local_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL]
        self._h2_state.max_inbound_frame_size = FRAME
        self._h2_state.initiate_connection()
        self._h2_state.increment_flow_control_window(WINDOW)
        await self._write_outgoing_data(request)

    ch2.AsyncHTTP2Connection._send_connection_init = _send_connection_init
