"""The peer's web page: public status for anyone, the owner's console behind a login.

Two listeners serve it. The peer's own port (HTTP/2 over TLS with the peer's
Ed25519 certificate, which browsers do not accept yet) answers ``GET /`` with the
public page through ``peer.page``. The console listener, started by the
governance service, serves the console app (:mod:`p2pgrid.console`: Starlette,
Jinja2 templates) to browsers: plain HTTP on 127.0.0.1 by default, TLS with an
ECDSA certificate of its own when told to listen elsewhere.

Public: name, status, uptime, the peers it knows, what it advertises (dataset ids,
tags, shapes, descriptions), the models it serves. Owner only: see
:mod:`p2pgrid.console.app`.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import trio

from .console.views import training_runs
from .limits import EdgeLimits

__all__ = ["render_status", "public_page", "serve_console", "console_certificate", "training_runs"]

log = logging.getLogger("p2pgrid.web")

CONSOLE_LIMITS = EdgeLimits(max_connections=32, max_connections_per_address=16)  # one owner's browser


def render_status(peer) -> str:
    """The public page's HTML: facts this peer already announces to the network."""
    from .console import views
    from .console.render import render

    return render("public.html", {**views.public(peer), "login": False})


async def public_page(peer, scope, body) -> tuple[int, str, bytes]:
    """``peer.page``: the public page on the peer's own port (GET only)."""
    if scope.get("method") != "GET":
        return 405, "text/plain", b"method not allowed\n"
    if scope.get("path") not in ("/", ""):
        return 404, "text/plain", b"not found\n"
    text = await trio.to_thread.run_sync(render_status, peer)
    return 200, "text/html; charset=utf-8", text.encode()


# ------------------------------------------------------------------ the listener

def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def console_certificate(directory: Path, host: str) -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate for the console (browsers take no Ed25519)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = directory / "console-cert.pem", directory / "console-key.pem"
    if certfile.exists() and keyfile.exists():
        return str(certfile), str(keyfile)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        san = [x509.DNSName(host)]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pgrid console {host}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(key, hashes.SHA256()))
    keyfile.touch(mode=0o600)
    keyfile.chmod(0o600)
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(certfile), str(keyfile)


async def serve_console(peer, gov, *, host: str = "127.0.0.1", port: int = 0,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the console until cancelled; reports its base URL. Plain HTTP on loopback,
    TLS (ECDSA, self-signed) anywhere else. Port 0: the last run's port, else any."""
    from .server import serve

    data = Path(peer.config.data_dir)
    secure = not _is_loopback(host)
    certfile = keyfile = None
    if secure:
        certfile, keyfile = console_certificate(data / "console-tls", host)
    from .console.app import Console

    app = Console(peer, gov, secure=secure)
    saved = data / "console-port"
    candidates = [port] if port else []
    if not port:
        try:
            candidates.append(int(saved.read_text()))
        except (OSError, ValueError):
            pass
        candidates.append(0)

    async def run(p, task_status):
        await serve(app, host=host, port=p, certfile=certfile, keyfile=keyfile,
                    limits=CONSOLE_LIMITS, task_status=task_status)

    async with trio.open_nursery() as nursery:
        for i, p in enumerate(candidates):
            try:
                binds = await nursery.start(run, p)
                break
            except OSError:
                if i == len(candidates) - 1:
                    raise
        bound = int(str(binds[0]).rsplit(":", 1)[1])
        saved.write_text(f"{bound}\n")
        shown = host if ":" not in host else f"[{host}]"
        url = f"{'https' if secure else 'http'}://{shown}:{bound}"
        peer.page = public_page
        task_status.started(url)
