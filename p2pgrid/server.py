"""The peer's HTTP/2 edge: an ASGI app served by hypercorn's trio worker.

Routes: ``POST /rpc`` carries one signed CBOR message and answers one;
``GET /`` is the peer's page; ``GET /health`` a liveness probe. Everything
protocol-specific lives in handlers; this module only moves bytes, checks
sizes and signatures, and maps typed errors to HTTP statuses.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Awaitable, Callable

import trio

from . import h2tuning, hypercorn_fixes, wire
from .auth import H_DIGEST, Caller, Verifier
from .errors import P2PError, PayloadTooLarge, Unauthenticated

log = logging.getLogger("p2pgrid.server")

CHUNK = 1 << 20
OFFLOAD = 1 << 20  # bodies larger than this are encoded/decoded in a worker thread

Dispatch = Callable[[Caller, object], Awaitable[object]]
Page = Callable[[dict, bytes], Awaitable[tuple[int, str, bytes]]]


async def _to_thread_if_big(n: int, fn, *args):
    if n > OFFLOAD:
        return await trio.to_thread.run_sync(fn, *args)
    return fn(*args)


class App:
    """ASGI application; `dispatch(caller, message)` returns the reply message."""

    def __init__(self, verifier: Verifier, authorize: Callable[[Caller], None],
                 dispatch: Dispatch, *, max_body: int, page: Page | None = None,
                 identity_card: bytes = b""):
        self.verifier = verifier
        self.authorize = authorize
        self.dispatch = dispatch
        self.max_body = max_body
        self.page = page
        self.identity_card = identity_card  # CBOR {name, public_key}: first contact without TLS

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if path == "/rpc" and method == "POST":
                await self._rpc(scope, headers, receive, send)
            elif path == "/health" and method == "GET":
                await _respond(send, 200, "text/plain", b"ok\n")
            elif path == "/id" and method == "GET":
                await _respond(send, 200, "application/cbor", self.identity_card)
            elif self.page is not None and method in ("GET", "POST"):
                body = await _read_body(receive, 1 << 20) if method == "POST" else b""
                status, ctype, content = await self.page(scope | {"headers_dict": headers}, body)
                await _respond(send, status, ctype, content)
            else:
                await _respond(send, 404, "text/plain", b"not found\n")
        except _ClientGone:
            pass

    async def _rpc(self, scope, headers, receive, send):
        try:
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                raise PayloadTooLarge(f"declared body of {declared} bytes exceeds the limit of "
                                      f"{self.max_body}")
            # Check the signature before reading a possibly huge body: the signed
            # digest is compared with the body's once it has arrived.
            caller = self.verifier.verify("POST", "/rpc", headers, headers.get(H_DIGEST, ""),
                                          now=time.time())
            self.authorize(caller)
            body = await _read_body(receive, self.max_body)
            digest = await _to_thread_if_big(len(body), lambda b: hashlib.sha256(b).hexdigest(), body)
            if digest != headers.get(H_DIGEST):
                raise Unauthenticated("body does not match its signed digest")
            msg = await _to_thread_if_big(len(body), lambda b: wire.decode(b, max_size=self.max_body),
                                          body)
            del body
            reply = await self.dispatch(caller, msg)
            out = await _to_thread_if_big(_approx_size(reply), wire.encode, reply)
            await _respond(send, 200, "application/cbor", out)
        except P2PError as e:
            if e.status >= 500:
                log.warning("rpc failed: %s", e.code)
            await _respond(send, e.status, "application/cbor", wire.dumps(e.to_wire()))
        except _ClientGone:
            raise
        except Exception:
            log.exception("unexpected error in rpc handler")
            err = P2PError("internal error; see the peer's log")
            await _respond(send, 500, "application/cbor", wire.dumps(err.to_wire()))


def _approx_size(msg) -> int:
    import torch
    total = 0
    for v in getattr(msg, "__dict__", {}).values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


class _ClientGone(Exception):
    pass


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        if chunk:
            chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(send, status: int, ctype: str, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype.encode()),
                            (b"content-length", str(len(body)).encode())]})
    view = memoryview(body)
    for start in range(0, max(len(body), 1), CHUNK):
        more = start + CHUNK < len(body)
        await send({"type": "http.response.body", "body": bytes(view[start:start + CHUNK]),
                    "more_body": more})


async def serve(app: App, *, host: str, port: int, certfile: str | None, keyfile: str | None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` until cancelled; reports the bound "host:port" via task_status."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    h2tuning.apply()
    hypercorn_fixes.apply()
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.h2_max_inbound_frame_size = h2tuning.FRAME
    config.h2_max_concurrent_streams = 256
    config.keep_alive_timeout = 300
    config.keep_alive_max_requests = 1 << 30
    config.read_timeout = None
    config.max_app_queue_size = 64
    config.accesslog = None
    config.errorlog = logging.getLogger("p2pgrid.hypercorn")
    if certfile:
        config.certfile, config.keyfile = certfile, keyfile
        config.alpn_protocols = ["h2"]
    await hypercorn_serve(app, config, task_status=task_status, mode="asgi")
