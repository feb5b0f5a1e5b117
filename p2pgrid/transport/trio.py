"""trio: every TLS record already received per read, larger socket reads, and TLS on
the socket itself for the server.

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

- **The server's TLS without memory BIOs.** trio's SSLStream feeds OpenSSL through memory
  BIOs: every byte is copied from the socket into a bytes object, into the BIO, and out
  again per record, with a pass through its retry loop each. :class:`SocketTLS` is a
  trio stream over a non-blocking ``ssl.SSLSocket`` (OpenSSL reads the socket itself and
  decrypts into the caller's buffer, as a blocking Python TLS socket does), waiting with
  ``trio.lowlevel.wait_readable``/``wait_writable``. The server's :class:`TLSListener`
  makes its connections of it, and bulk connections (:mod:`p2pgrid.bulk`) use it at both
  ends; the HTTP/2 client still runs on DrainingTLS over BigReads (httpcore builds its own
  TLS stream). Not an upstream bug: the memory BIOs are trio's design (it supports any
  transport stream), and stay.

Scope: the first two are wrappers, not patches (trio's streams are ``@final``): only the
streams built by the peer's client backend (:mod:`p2pgrid.transport.httpcore`) use them.
They read SSLStream's private ``_ssl_object`` and ``_incoming``, which patchguard pins by
version. :class:`SocketTLS` uses only public ``ssl`` and ``trio.lowlevel`` calls; only
:func:`p2pgrid.transport.hypercorn.serve`'s listener (and :mod:`p2pgrid.bulk`) build it.
"""

from __future__ import annotations

import select
import socket
import ssl

import trio

RECEIVE = 256 * 1024  # what the TLS layer asks the socket for per read
_RECORD = 16384       # a TLS record's most plaintext
_SEND = 1 << 20       # bytes handed to OpenSSL per write


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


class SocketTLS(trio.abc.Stream):
    """TLS on a non-blocking ``ssl.SSLSocket`` driven by trio's readiness waits.

    OpenSSL reads the socket and decrypts into the caller's buffer itself
    (:meth:`receive_into`), as a blocking Python TLS socket does; trio's SSLStream
    instead copies every byte through memory BIOs and a bytes object per record.
    One task may send and one receive at a time (as any trio stream). A send that is
    cancelled or fails leaves OpenSSL waiting for the same bytes again, so the stream
    is then broken (every later call raises BrokenResourceError) and must be closed."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool = False,
                 server_hostname: str | None = None) -> None:
        sock.setblocking(False)
        self.socket = context.wrap_socket(sock, server_side=server_side,
                                          do_handshake_on_connect=False,
                                          server_hostname=server_hostname)
        self._broken = False

    @classmethod
    async def connect(cls, host: str, port: int, context: ssl.SSLContext) -> SocketTLS:
        """Connect over TCP and complete the TLS handshake (the caller sets a deadline)."""
        tcp = await trio.open_tcp_stream(host, port)
        try:
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            fd = tcp.socket.detach()  # the fd moves to a stdlib socket for ssl to own
        finally:
            await trio.aclose_forcefully(tcp)
        stream = cls(socket.socket(fileno=fd), context)
        try:
            await stream.do_handshake()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    def _check(self) -> None:
        if self._broken:
            raise trio.BrokenResourceError("the TLS stream broke earlier")
        if self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the TLS stream is closed")

    async def _wait(self, err: ssl.SSLError) -> None:
        if isinstance(err, ssl.SSLWantWriteError):
            await trio.lowlevel.wait_writable(self.socket)
        else:
            await trio.lowlevel.wait_readable(self.socket)

    async def do_handshake(self) -> None:
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                self.socket.do_handshake()
                return
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                await self._wait(e)
            except (ssl.SSLError, OSError) as e:
                self._broken = True
                raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from e

    def selected_alpn_protocol(self) -> str | None:
        return self.socket.selected_alpn_protocol()

    async def _read(self, limit: int, read) -> int:
        """Call ``read(got)`` (one non-blocking TLS read; the count it took, 0 at the end
        of the stream) until `limit` bytes, the end, or, once some arrived, nothing more
        decrypted without waiting; waits only while nothing has arrived. The count."""
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        got, waited = 0, False
        while got < limit:
            try:
                n = read(got)
            except ssl.SSLWantReadError as e:
                if got:
                    break  # nothing more decrypted without waiting: hand over what we have
                waited = True
                await self._wait(e)
                continue
            except ssl.SSLWantWriteError as e:
                waited = True
                await self._wait(e)
                continue
            except ssl.SSLZeroReturnError:
                break
            except (ssl.SSLError, OSError) as e:
                self._broken = True
                raise trio.BrokenResourceError(f"TLS read failed: {e}") from e
            if n == 0:
                break
            got += n
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return got

    async def receive_into(self, view: memoryview) -> int:
        """Decrypt into `view` what has arrived (waiting for at least one byte); the
        count, 0 at the end of the stream."""
        return await self._read(len(view), lambda got: self.socket.recv_into(view[got:]))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Every record already decrypted or received, up to `max_bytes` (waiting for
        at least one byte); b"" at the end of the stream."""
        max_bytes = max_bytes or RECEIVE
        parts: list[bytes] = []

        def read(got: int) -> int:
            # at most one record per call; 16 KiB (a record's most) allocates no more
            parts.append(self.socket.recv(min(max_bytes - got, _RECORD)))
            return len(parts[-1])

        await self._read(max_bytes, read)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def send_all(self, data) -> None:
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data).cast("B")
        waited = False
        try:
            while view:
                # retried after a wait with the very same bytes, as OpenSSL requires
                chunk = view[:_SEND]
                try:
                    view = view[self.socket.send(chunk):]
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as e:
                    waited = True
                    await self._wait(e)
        except BaseException as e:
            self._broken = True  # OpenSSL may hold part of `chunk`: nothing else may follow
            if isinstance(e, (ssl.SSLError, OSError)):
                raise trio.BrokenResourceError(f"TLS write failed: {e}") from e
            raise
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    def is_readable(self) -> bool:
        """Whether anything (data, a close) has arrived: an idle connection that is
        readable was almost certainly closed by the peer."""
        if self.socket.fileno() < 0:
            return True
        if self.socket.pending():
            return True
        poll = select.poll()   # not select(): a busy peer's descriptors pass 1024
        poll.register(self.socket, select.POLLIN)
        return bool(poll.poll(0))

    async def aclose(self) -> None:
        # no close_notify exchange (as trio's https_compatible streams): HTTP/2 and bulk
        # exchanges are framed, so an early end is an error either way.
        if self.socket.fileno() >= 0:
            # tasks waiting on the fd must wake (ClosedResourceError) and trio forget it
            # before the number can be reused by the next accepted connection
            trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
        await trio.lowlevel.checkpoint()


class TLSListener(trio.abc.Listener):
    """As ``trio.SSLListener``, but its streams are :class:`SocketTLS` (the handshake is
    the server's to do, under its timeout)."""

    def __init__(self, listener: trio.SocketListener, context: ssl.SSLContext) -> None:
        self.listener, self.context = listener, context

    async def accept(self) -> SocketTLS:
        stream = await self.listener.accept()   # TCP_NODELAY set by trio, kept by the fd
        try:
            fd = stream.socket.detach()
        finally:
            await trio.aclose_forcefully(stream)
        return SocketTLS(socket.socket(fileno=fd), self.context, server_side=True)

    async def aclose(self) -> None:
        await self.listener.aclose()


def socket_of(stream):
    """The trio socket under `stream` (through TLS and the wrappers above)."""
    while not hasattr(stream, "socket"):
        stream = stream.transport_stream
    return stream.socket
