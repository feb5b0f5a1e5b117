"""Version and symbol guard for the libraries p2pgrid's transport changes (p2pgrid.transport).

:mod:`p2pgrid.transport` subclasses and wraps classes of h2, hyperframe, hpack, trio,
hypercorn and httpcore, overriding private methods (some with edited versions of the
upstream logic) and calling others. Written for one version and run over another,
they could be slow or wrong without a word. So before the first peer server or client
is built, :func:`check` verifies each library's installed version (exact pins: the
versions the changes were written and tested against, also pinned in pyproject.toml
and constraints.txt) and that every upstream symbol they override or rely on exists
with the parameters it had. Any mismatch is one :class:`PatchMismatch`, one line
naming the library, the version found and the versions supported.

``P2PGRID_UNPATCHED=1`` turns that refusal into a warning and leaves the speed changes
off (stock classes): correct, only slower. The server's hypercorn fixes
(:class:`p2pgrid.transport.hypercorn.SafeTCPServer`) still apply
and the client's httpcore fixes (:class:`p2pgrid.transport.httpcore.SafeHTTP2Connection`)
still apply (:func:`check_required` with :data:`SAFETY_PATHS`): stock hypercorn lets one
client's DATA frame on a closed stream end a connection (and the connection table and
failure counting live there), and stock httpcore can hang a streamed body; so the
symbols they use must still be there with that shape.
Nothing is patched: the check guards our subclasses, which only the peer's own
objects use.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os

log = logging.getLogger("p2pgrid.patchguard")

ENV = "P2PGRID_UNPATCHED"

# Exact versions p2pgrid.transport was written against. A wider range only where a test
# run proves it (none yet).
SUPPORTED: dict[str, tuple[str, ...]] = {
    "h2": ("4.4.1",),
    "hpack": ("4.2.0",),
    "hyperframe": ("6.1.0",),
    "trio": ("0.35.0",),
    "hypercorn": ("0.18.0",),
    "httpcore": ("1.0.9",),
    "httpx": ("0.29.0",),
}

# (module, attribute path, parameters without annotations or None for a non-function)
# for every upstream symbol p2pgrid.transport overrides or calls into. Regenerate with
# ``python -m p2pgrid.patchguard --table`` after a deliberate upgrade.
SYMBOLS: dict[str, list[tuple[str, str, str | None]]] = {
    "hyperframe": [
        ("hyperframe.frame", "DataFrame", None),
        ("hyperframe.frame", "DataFrame._body_repr", '(self)'),
        ("hyperframe.frame", "Frame.parse_frame_header", '(header, strict=False)'),
    ],
    "h2": [
        ("h2.connection", "H2Connection.__init__", '(self, config=None)'),
        ("h2.connection", "H2Connection._prepare_for_sending", '(self, frames)'),
        ("h2.connection", "H2Connection.data_to_send", '(self, amount=None)'),
        ("h2.frame_buffer", "FrameBuffer.__init__", '(self, server=False)'),
        ("h2.frame_buffer", "FrameBuffer.__next__", '(self)'),
        ("h2.frame_buffer", "FrameBuffer._validate_frame_length", '(self, length)'),
        ("h2.frame_buffer", "FrameBuffer._update_header_buffer", '(self, f)'),
        ("h2.settings", "Settings.__init__", '(self, client=True, initial_values=None)'),
    ],
    "hpack": [
        ("hpack", "Encoder.encode", '(self, headers, huffman=True)'),
    ],
    "trio": [
        ("trio", "SSLStream.__init__", '(self, transport_stream, ssl_context, *, server_hostname=None, server_side=False, https_compatible=False)'),
        ("trio", "SSLStream.receive_some", '(self, max_bytes=None)'),
        ("trio", "SSLListener.__init__", '(self, transport_listener, ssl_context, *, https_compatible=False)'),
        ("trio", "SocketListener.accept", '(self)'),
        ("trio", "serve_listeners", '(handler, listeners, *, handler_nursery=None, task_status=TASK_STATUS_IGNORED)'),
    ],
    "hypercorn": [
        ("hypercorn.protocol.h2", "H2Protocol.__init__", '(self, app, config, context, task_group, connection_state, ssl, client, server, send)'),
        ("hypercorn.protocol.h2", "H2Protocol.initiate", '(self, headers=None, settings=None)'),
        ("hypercorn.protocol.h2", "H2Protocol.stream_send", '(self, event)'),
        ("hypercorn.protocol.h2", "H2Protocol._window_updated", '(self, stream_id)'),
        ("hypercorn.protocol.h2", "H2Protocol.send_task", '(self)'),
        ("hypercorn.protocol.h2", "H2Protocol.handle", '(self, event)'),
        ("hypercorn.protocol.h2", "H2Protocol._handle_events", '(self, events)'),
        ("hypercorn.protocol.h2", "H2Protocol._flush", '(self)'),
        ("hypercorn.protocol.h2", "H2Protocol._send_data", '(self, stream_id)'),
        ("hypercorn.protocol", "ProtocolWrapper.__init__", '(self, app, config, context, task_group, state, ssl, client, server, send, alpn_protocol=None)'),
        ("hypercorn.protocol", "ProtocolWrapper.handle", '(self, event)'),
        ("hypercorn.protocol.h11", "H2ProtocolAssumedError", None),
        ("hypercorn.protocol.h11", "H2CProtocolRequiredError", None),
        ("hypercorn.trio.tcp_server", "TCPServer.__init__", '(self, app, config, context, state, stream)'),
        ("hypercorn.trio.tcp_server", "TCPServer.run", '(self)'),
        ("hypercorn.trio.tcp_server", "TCPServer.protocol_send", '(self, event)'),
        ("hypercorn.trio.tcp_server", "TCPServer._read_data", '(self)'),
        ("hypercorn.trio.tcp_server", "TCPServer._idle_timeout", '(self)'),
        ("hypercorn.trio.tcp_server", "TCPServer._close", '(self)'),
        ("hypercorn.trio.tcp_server", "TCPServer._initiate_server_close", '(self)'),
        ("hypercorn.trio.lifespan", "Lifespan.__init__", '(self, app, config, state)'),
        ("hypercorn.trio.lifespan", "Lifespan.handle_lifespan", '(self, *, task_status=TASK_STATUS_IGNORED)'),
        ("hypercorn.trio.lifespan", "Lifespan.wait_for_startup", '(self)'),
        ("hypercorn.trio.worker_context", "WorkerContext.__init__", '(self, max_requests)'),
        ("hypercorn.trio.task_group", "TaskGroup", None),
        ("hypercorn.trio.task_group", "TaskGroup.spawn_app", '(self, app, config, scope, send)'),
        ("hypercorn.config", "Config.create_sockets", '(self)'),
        ("hypercorn.config", "Config.create_ssl_context", '(self)'),
        ("hypercorn.config", "Config.set_statsd_logger_class", '(self, statsd_logger)'),
        ("hypercorn.utils", "wrap_app", '(app, wsgi_max_body_size, mode)'),
        ("hypercorn.utils", "parse_socket_addr", '(family, address)'),
        ("hypercorn.utils", "repr_socket_addr", '(family, address)'),
    ],
    "httpcore": [
        ("httpcore._async.http2", "AsyncHTTP2Connection.__init__", '(self, origin, stream, keepalive_expiry=None)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection.READ_NUM_BYTES", None),
        ("httpcore._async.http2", "AsyncHTTP2Connection._send_connection_init", '(self, request)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._send_request_headers", '(self, request, stream_id)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._send_request_body", '(self, request, stream_id)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._send_stream_data", '(self, request, stream_id, data)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._write_outgoing_data", '(self, request)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._wait_for_outgoing_flow", '(self, request, stream_id)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._send_end_stream", '(self, request, stream_id)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._receive_events", '(self, request, stream_id=None)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._read_incoming_data", '(self, request)'),
        ("httpcore._async.http2", "AsyncHTTP2Connection._receive_remote_settings_change", '(self, event)'),
        ("httpcore._async.http2", "RemoteProtocolError", None),
        ("httpcore._async.http2", "HTTPConnectionState", None),
        ("httpcore._async.http2", "has_body_headers", '(request)'),
        ("httpcore._async.http2", "ConnectionNotAvailable", None),
        ("httpcore._synchronization", "AsyncSemaphore.__init__", '(self, bound)'),
        ("httpcore._synchronization", "AsyncSemaphore.acquire", '(self)'),
        ("httpcore._synchronization", "AsyncSemaphore.setup", '(self)'),
        ("httpcore._async.connection", "AsyncHTTPConnection.__init__", '(self, origin, ssl_context=None, keepalive_expiry=None, http1=True, http2=False, retries=0, local_address=None, uds=None, network_backend=None, socket_options=None)'),
        ("httpcore._async.connection", "AsyncHTTPConnection.handle_async_request", '(self, request)'),
        ("httpcore._async.connection", "AsyncHTTPConnection._connect", '(self, request)'),
        ("httpcore", "AsyncConnectionPool.__init__", '(self, ssl_context=None, proxy=None, max_connections=10, max_keepalive_connections=None, keepalive_expiry=None, http1=True, http2=False, retries=0, local_address=None, uds=None, network_backend=None, socket_options=None)'),
        ("httpcore", "AsyncConnectionPool.create_connection", '(self, origin)'),
        ("httpcore._backends.trio", "TrioStream.start_tls", '(self, ssl_context, server_hostname=None, timeout=None)'),
        ("httpcore._backends.trio", "TrioStream.get_extra_info", '(self, info)'),
        ("httpcore._backends.trio", "TrioBackend.connect_tcp", '(self, host, port, timeout=None, local_address=None, socket_options=None)'),
    ],
    "httpx": [
        ("httpx", "ByteStream", None),
        ("httpx", "AsyncHTTPTransport.__init__", '(self, verify=True, cert=None, trust_env=True, http1=True, http2=False, limits=Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0), proxy=None, uds=None, local_address=None, retries=0, socket_options=None)'),
    ],
}

# What the fixes (SafeH2Protocol, PeerProtocolWrapper, SafeTCPServer, serve;
# SafeHTTP2Connection, PeerHTTPConnection, PeerConnectionPool, PeerHTTPTransport) use
# of hypercorn and httpcore: required even with P2PGRID_UNPATCHED=1.
SAFETY_PATHS = tuple(path for lib in ("hypercorn", "httpcore") for _, path, _ in SYMBOLS[lib]
                     if path not in (
    "H2Protocol.initiate", "H2Protocol.stream_send", "H2Protocol._window_updated",
    "H2Protocol.send_task", "H2Protocol.handle", "H2Protocol._send_data", "H2Protocol._flush",
    "TCPServer.protocol_send", "TCPServer._idle_timeout", "TCPServer._initiate_server_close",
    "AsyncHTTP2Connection.READ_NUM_BYTES", "AsyncHTTP2Connection._send_connection_init",
    "AsyncHTTP2Connection._send_request_body", "AsyncHTTP2Connection._send_stream_data",
    "AsyncHTTP2Connection._send_end_stream", "has_body_headers",
    "TrioStream.start_tls", "TrioStream.get_extra_info", "TrioBackend.connect_tcp"))


class PatchMismatch(RuntimeError):
    """A library is not the version (or shape) p2pgrid.transport was written for."""


def unpatched() -> bool:
    """True when the user asked for stock libraries (``P2PGRID_UNPATCHED=1``)."""
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def shape(fn) -> str:
    """The parameters of `fn` (names, kinds, defaults) without annotations."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def problems(libraries=None, *, paths=None, versions: bool = True) -> list[str]:
    """One line per mismatch in `libraries` (default: all), empty if all is as expected.
    `paths` limits the symbols checked to those attribute paths; `versions=False` checks
    symbols only."""
    out = []
    for lib in libraries or SUPPORTED:
        found = installed_version(lib)
        supported = ", ".join(SUPPORTED[lib])
        if found not in SUPPORTED[lib] and versions:
            out.append(f"{lib} {found or 'missing'} is installed but p2pgrid's transport "
                       f"patches support {lib} {supported} only")
            continue
        for module, path, params in SYMBOLS.get(lib, ()):
            if paths is not None and path not in paths:
                continue
            try:
                obj = _resolve(module, path)
            except (ImportError, AttributeError):
                out.append(f"{lib} {found}: {module}.{path} is gone (supported: {supported})")
                continue
            if params is None:
                continue
            got = shape(obj)
            if got != params:
                out.append(f"{lib} {found}: {module}.{path}{got} changed, expected {params} "
                           f"(supported: {supported})")
    return out


def _refuse(found: list[str]) -> PatchMismatch:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return PatchMismatch(f"{found[0]}{more}; install constraints.txt's versions, or set {ENV}=1 "
                         f"to run unpatched (slower)")


def check(libraries=None, what: str = "transport patches") -> bool:
    """Whether to use the speed changes for `libraries`: True when all match.

    Raises :class:`PatchMismatch` (one line) on a mismatch; with ``P2PGRID_UNPATCHED=1``
    logs a WARNING instead and returns False, as it does whenever that is set.
    """
    found = problems(libraries)
    if unpatched():
        reason = f" ({found[0]})" if found else ""
        log.warning("%s=1: %s not applied, libraries run stock (slower)%s", ENV, what, reason)
        return False
    if found:
        raise _refuse(found)
    return True


def check_required(libraries, paths, what: str) -> None:
    """Guard for fixes the peer cannot run safely without (stock is not correct there).

    As :func:`check`, except that ``P2PGRID_UNPATCHED=1`` only excuses a version
    mismatch (a WARNING): the symbols in `paths` must still be there with the shape the
    fix wraps, else :class:`PatchMismatch` all the same.
    """
    if not unpatched():
        found = problems(libraries, paths=paths)
        if found:
            raise _refuse(found)
        return
    broken = problems(libraries, paths=paths, versions=False)
    if broken:
        raise PatchMismatch(f"{broken[0]}; {what} cannot be applied and the stock libraries "
                            f"are not safe to run with: install constraints.txt's versions")
    off = problems(libraries, paths=())
    if off:
        log.warning("%s=1: %s applied over an unsupported version (%s)", ENV, what, off[0])


def _table() -> str:
    lines = []
    for lib, syms in SYMBOLS.items():
        lines.append(f'    "{lib}": [')
        for module, path, params in syms:
            obj = _resolve(module, path)
            p = shape(obj) if inspect.isfunction(obj) else None
            lines.append(f'        ("{module}", "{path}", {p!r}),')
        lines.append("    ],")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--table" in sys.argv:
        print(_table())
    else:
        for line in problems():
            print(line)
