"""The transport's changes to its libraries: pinned, guarded, scoped, failures never swallowed.

p2pgrid.transport subclasses and wraps private parts of h2, hyperframe, hpack, trio,
hypercorn and httpcore for the peer's own objects. p2pgrid.patchguard refuses (one line)
any version or symbol shape they were not written for; P2PGRID_UNPATCHED=1 runs the
peer on stock classes (plus the server's safety fixes).
"""

import gc
import logging
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import trio

from p2pgrid import patchguard, transport

ROOT = Path(__file__).resolve().parent.parent


def _upstream_attributes():
    """The current objects behind every upstream symbol the transport overrides or uses."""
    return {(m, p): patchguard._resolve(m, p)
            for syms in patchguard.SYMBOLS.values() for m, p, _ in syms}


def _bump(monkeypatch, lib="h2", version="9.9.9"):
    real = patchguard.installed_version
    monkeypatch.setattr(patchguard, "installed_version",
                        lambda dist: version if dist == lib else real(dist))


def _live(cls) -> list:
    """Objects of `cls` alive now (isinstance on some torch objects warns: ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, cls)]


@pytest.fixture
def unchecked(monkeypatch):
    """The transport as if no peer object had been built yet in this process."""
    monkeypatch.setattr(transport, "_tuned", None)
    monkeypatch.setattr(transport, "_safe", False)


def test_pins_agree_with_the_guard_and_the_installed_libraries():
    # pyproject, constraints.txt and the guard name the same exact versions, and they are
    # the ones installed here: what CI tests is what users get
    pins = {}
    for req in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, version = req.partition("==")
        pins[name.split("[")[0].lower()] = version
    constraints = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            constraints[name.lower()] = version
    for lib, supported in patchguard.SUPPORTED.items():
        assert pins[lib] in supported, lib
        assert constraints[lib] in supported, lib
        assert patchguard.installed_version(lib) in supported, lib
    assert constraints["torch"] == "2.13.0"
    assert "p2pgrid" not in constraints
    assert patchguard.problems() == []


@pytest.mark.parametrize("check, lib, found, supported",
                         [(transport.tuned, "h2", "9.9.9", "4.4.1"),
                          (transport.require_safety, "hypercorn", "0.99.0", "0.18.0")],
                         ids=["speed", "safety"])
def test_a_mismatching_version_is_refused_in_one_line(monkeypatch, unchecked, check, lib,
                                                      found, supported):
    _bump(monkeypatch, lib, found)
    monkeypatch.delenv(patchguard.ENV, raising=False)
    with pytest.raises(patchguard.PatchMismatch) as caught:
        check()
    message = str(caught.value)
    assert "\n" not in message
    assert f"{lib} {found} is installed" in message and supported in message
    assert transport._tuned is None and transport._safe is False  # nothing was let through


def test_a_missing_symbol_or_changed_signature_is_refused(monkeypatch, unchecked):
    import hpack
    from httpcore._async import http2

    monkeypatch.setattr(hpack.Encoder, "encode", lambda self, headers: b"")
    monkeypatch.delattr(http2.AsyncHTTP2Connection, "_send_end_stream")
    found = patchguard.problems()
    assert any("hpack 4.2.0: hpack.Encoder.encode(self, headers) changed" in p for p in found), found
    assert any("AsyncHTTP2Connection._send_end_stream is gone" in p for p in found), found
    monkeypatch.delenv(patchguard.ENV, raising=False)
    with pytest.raises(patchguard.PatchMismatch, match=r"\(and 1 more\)"):
        transport.tuned()


def test_unpatched_env_leaves_the_speed_changes_off_with_a_warning(monkeypatch, caplog, unchecked):
    _bump(monkeypatch, "h2", "9.9.9")
    monkeypatch.setenv(patchguard.ENV, "1")
    with caplog.at_level(logging.WARNING, logger="p2pgrid.patchguard"):
        assert transport.tuned() is False
        assert transport.tuned() is False  # warned once per process
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "h2 9.9.9" in warned[0], warned


def test_unpatched_env_still_needs_the_safety_fixes_symbols(monkeypatch, caplog, unchecked):
    # stock hypercorn is not safe to serve with (a DATA frame on a closed stream ends the
    # connection), so the server's fixes apply over a bumped version if what they
    # override is intact, with a warning, and refuse if not
    from hypercorn.trio import tcp_server

    monkeypatch.setenv(patchguard.ENV, "1")
    _bump(monkeypatch, "hypercorn", "0.99.0")
    with caplog.at_level(logging.WARNING, logger="p2pgrid.patchguard"):
        transport.require_safety()
    assert transport._safe is True
    assert "hypercorn 0.99.0" in caplog.text
    monkeypatch.setattr(transport, "_safe", False)
    monkeypatch.setattr(tcp_server.TCPServer, "run", lambda self, extra: None)
    with pytest.raises(patchguard.PatchMismatch, match="TCPServer.run"):
        transport.require_safety()


async def test_the_changes_reach_only_the_peer_s_own_objects(tmp_path):
    # a peer network runs on the tuned classes, and afterwards every upstream class and
    # module global is as released: another hypercorn/httpx user in the process gets stock
    import h2.connection
    import hypercorn.trio.tcp_server
    import trio._highlevel_socket

    from p2pgrid.messages import Ping, Pong
    from p2pgrid.testing import open_network
    from p2pgrid.transport.httpcore import PeerHTTPTransport
    from p2pgrid.transport.hypercorn import TunedTCPServer

    async with open_network(["a", "b"], tmp_path) as peers:
        assert isinstance(await peers["a"].request("b", Ping()), Pong)
        assert _live(TunedTCPServer)
        assert all(type(p) is PeerHTTPTransport for p in peers["a"].transport._pools.values())
    for (module, path), obj in _upstream_attributes().items():
        assert not getattr(obj, "__module__", "").startswith("p2pgrid."), (module, path)
    assert hypercorn.trio.tcp_server.MAX_RECV == 2 ** 16
    assert trio._highlevel_socket.DEFAULT_RECEIVE_SIZE == 65536
    assert h2.connection.H2Connection.data_to_send.__module__ == "h2.connection"


def _fake_dist(tmp_path, name, version) -> Path:
    # a distribution record ahead of site-packages: importlib.metadata then reports
    # `version`, as after `pip install name==version`, while the code stays the same
    site = tmp_path / "bumped"
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return site


def test_a_peer_with_a_bumped_library_fails_at_startup_with_one_line(tmp_path):
    site = _fake_dist(tmp_path, "h2", "9.9.9")
    env = {k: v for k, v in os.environ.items() if k != patchguard.ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env["HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "p2pgrid.cli", "peer", "--name", "alice",
                           "--port", "0", "--no-mdns"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("p2pgrid peer: h2 9.9.9 is installed")
    assert "4.4.1" in err and patchguard.ENV in err


@pytest.mark.skipif(not patchguard.unpatched(), reason="checked in a process run with P2PGRID_UNPATCHED=1")
async def test_libraries_stay_stock_when_unpatched(tmp_path):
    from p2pgrid.messages import Ping, Pong
    from p2pgrid.testing import open_network
    from p2pgrid.transport.httpcore import PeerHTTPTransport, PeerTrioBackend, SafeHTTP2Connection
    from p2pgrid.transport.hypercorn import SafeTCPServer, TunedTCPServer

    async with open_network(["a", "b"], tmp_path) as peers:
        assert isinstance(await peers["a"].request("b", Ping()), Pong)
        # stock speed: httpcore's streams and settings, with the client's fixes only
        pools = list(peers["a"].transport._pools.values())
        assert pools and all(type(p) is PeerHTTPTransport and p._pool.h2_class is SafeHTTP2Connection
                             and not isinstance(p._pool._network_backend, PeerTrioBackend)
                             for p in pools)
        servers = _live(SafeTCPServer)
        assert servers and not any(isinstance(o, TunedTCPServer) for o in servers)


def test_transport_tests_pass_with_the_patches_off(tmp_path):
    # correct, only slower: a bounded subset of the transport tests on stock speed (the
    # fixes stay on). Stock httpcore hung a call on a push stream here for 120 s (its
    # flow-control wait, see p2pgrid.transport.httpcore; reproduced in
    # tests/test_transport_upstream.py)
    env = dict(os.environ, **{patchguard.ENV: "1", "PYTHONPATH": str(ROOT)})
    tests = [
        "tests/test_patchguard.py::test_libraries_stay_stock_when_unpatched",
        "tests/test_transport.py::test_bodies_of_many_sizes_round_trip_intact",
        "tests/test_transport.py::test_oversized_body_is_refused_and_the_peer_keeps_serving",
        "tests/test_transport.py::test_a_client_pinned_to_the_wrong_certificate_cannot_talk",
        "tests/test_push.py::test_calls_answer_like_requests",
    ]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *tests], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


async def test_a_failing_connection_is_logged_with_its_traceback_and_counted(monkeypatch, caplog):
    from hypercorn.protocol import h11

    from p2pgrid import server

    class App:
        connection_failures = transport.FailureCount()

        async def __call__(self, scope, receive, send):
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                return
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    stock = h11.H11Protocol.handle

    async def broken(self, event):
        raise RuntimeError("a patch broke")

    async def get(address):
        host, port = address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        got = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some():
                got += chunk
                if got.endswith(b"ok"):
                    break
        await stream.aclose()
        return got

    app = App()
    before = transport.failures.count
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(lambda task_status: server.serve(
                app, host="127.0.0.1", port=0, certfile=None, keyfile=None, task_status=task_status))
            address = (address[0] if isinstance(address, list) else address).split("://")[-1]
            monkeypatch.setattr(h11.H11Protocol, "handle", broken)
            with caplog.at_level(logging.ERROR, logger="p2pgrid.server"):
                assert b"ok" not in await get(address)
            monkeypatch.setattr(h11.H11Protocol, "handle", stock)
            assert (await get(address)).endswith(b"\r\n\r\nok")  # the server goes on
            nursery.cancel_scope.cancel()
    assert app.connection_failures.count == 1
    assert app.connection_failures.last in ("RuntimeError", "ExceptionGroup")
    assert transport.failures.count == before + 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "p2pgrid.server"]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "a patch broke" in caplog.text  # the traceback is in the log
