"""trio: every TLS record already received per read, and larger socket reads.

- **One TLS record per receive_some.** trio 0.35.0's ``SSLStream.receive_some`` makes
  one ``SSLObject.read``, and OpenSSL returns at most one record (16 KiB) per read, so a
  1 MB HTTP/2 DATA frame took 64 trips through hypercorn's (or httpcore's) read loop and
  h2's frame buffer, each with a scheduler checkpoint. Upstream knows the record
  handling is not optimal (python-trio/trio#196, "SSL: optimize handling of
  packets/framing", open) and chose the receive-size heuristic in
  python-trio/trio#1123. :class:`DrainingTLS` wraps an SSLStream: after its normal read
  it also takes the records already complete in the incoming buffer (no I/O, no
  waiting), up to ``max_bytes``. Errors are left for the next call: OpenSSL keeps them
  (a close_notify, a bad record), and trio sends anything the reads queued for the
  other side on its next operation. Remove when SSLStream returns all decrypted data
  up to ``max_bytes`` itself.
- **64 KiB socket reads.** ``SSLStream`` asks its transport for ``receive_some()``
  without a size, which a SocketStream answers with at most
  ``trio._highlevel_socket.DEFAULT_RECEIVE_SIZE`` (64 KiB), four records per pass
  through trio's retry loop. :class:`BigReads` wraps the socket stream and asks for
  256 KiB. A configuration trio does not expose (no upstream bug).

Scope: both are wrappers, not patches (trio's streams are ``@final``): only the streams
built by :func:`p2pgrid.transport.hypercorn.serve`'s listener (:class:`TLSListener`) and
by the peer's client backend (:mod:`p2pgrid.transport.httpcore`) use them. They read
SSLStream's private ``_ssl_object`` and ``_incoming``, which patchguard pins by version.
"""

from __future__ import annotations

import ssl

import trio

RECEIVE = 256 * 1024  # what the TLS layer asks the socket for per read


class BigReads(trio.abc.HalfCloseableStream):
    """A SocketStream whose size-less reads ask for :data:`RECEIVE` bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket

    async def receive_some(self, max_bytes=None):
        return await self.stream.receive_some(max_bytes or RECEIVE)

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def setsockopt(self, *args) -> None:
        self.stream.setsockopt(*args)

    def getsockopt(self, *args):
        return self.stream.getsockopt(*args)


class DrainingTLS(trio.abc.Stream):
    """An SSLStream whose reads return every record already received (see the module
    docstring); anything else (handshake, ALPN, transport_stream) is the SSLStream's."""

    def __init__(self, tls: trio.SSLStream) -> None:
        self.tls = tls

    def __getattr__(self, name):
        return getattr(self.tls, name)

    async def receive_some(self, max_bytes=None):
        tls = self.tls
        data = await tls.receive_some(max_bytes)
        if not data or max_bytes is None or len(data) >= max_bytes:
            return data
        ssl_object, incoming = tls._ssl_object, tls._incoming
        if not incoming.pending and not ssl_object.pending():
            return data
        parts, size = [data], len(data)
        while size < max_bytes:
            try:
                more = ssl_object.read(max_bytes - size)
            except ssl.SSLError:  # SSLWantReadError: no whole record left
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts) if len(parts) > 1 else data

    async def send_all(self, data) -> None:
        await self.tls.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tls.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.tls.aclose()


class TLSListener(trio.abc.Listener):
    """As ``trio.SSLListener``, but its streams are :class:`DrainingTLS` over :class:`BigReads`."""

    def __init__(self, listener: trio.SocketListener, context: ssl.SSLContext) -> None:
        self.listener, self.context = listener, context

    async def accept(self) -> DrainingTLS:
        stream = await self.listener.accept()
        return DrainingTLS(trio.SSLStream(BigReads(stream), self.context, server_side=True,
                                          https_compatible=True))

    async def aclose(self) -> None:
        await self.listener.aclose()


def socket_of(stream):
    """The trio socket under `stream` (through TLS and the wrappers above)."""
    while not hasattr(stream, "socket"):
        stream = stream.transport_stream
    return stream.socket
