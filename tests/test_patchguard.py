"""The patched transport libraries: pinned, guarded before patching, failures never swallowed.

p2pgrid.h2tuning and p2pgrid.hypercorn_fixes replace private symbols of h2, hyperframe,
hpack, trio, hypercorn and httpcore. p2pgrid.patchguard refuses (one line) any version or
symbol shape they were not written for; P2PGRID_UNPATCHED=1 runs the libraries stock.
"""

import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trio

from p2pgrid import h2tuning, hypercorn_fixes, patchguard

ROOT = Path(__file__).resolve().parent.parent


def _patched_attributes():
    """The current objects behind every symbol the patches replace or use."""
    return {(m, p): patchguard._resolve(m, p)
            for syms in patchguard.SYMBOLS.values() for m, p, _ in syms}


def _bump(monkeypatch, lib="h2", version="9.9.9"):
    real = patchguard.installed_version
    monkeypatch.setattr(patchguard, "installed_version",
                        lambda dist: version if dist == lib else real(dist))


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


@pytest.mark.parametrize("module, lib, found, supported",
                         [(h2tuning, "h2", "9.9.9", "4.4.1"),
                          (hypercorn_fixes, "hypercorn", "0.99.0", "0.18.0")],
                         ids=["h2tuning", "hypercorn_fixes"])
def test_a_mismatching_version_is_refused_in_one_line_before_anything_is_patched(
        monkeypatch, module, lib, found, supported):
    _bump(monkeypatch, lib, found)
    monkeypatch.setattr(module, "_applied", False)
    monkeypatch.delenv(patchguard.ENV, raising=False)
    before = _patched_attributes()
    with pytest.raises(patchguard.PatchMismatch) as caught:
        module.apply()
    message = str(caught.value)
    assert "\n" not in message
    assert f"{lib} {found} is installed" in message and supported in message
    assert _patched_attributes() == before
    assert module._applied is False


def test_a_missing_symbol_or_changed_signature_is_refused(monkeypatch):
    import hpack
    from httpcore._async import http2

    monkeypatch.setattr(hpack.Encoder, "encode", lambda self, headers: b"")
    monkeypatch.delattr(http2.AsyncHTTP2Connection, "_send_end_stream")
    found = patchguard.problems()
    assert any("hpack 4.2.0: hpack.Encoder.encode(self, headers) changed" in p for p in found), found
    assert any("AsyncHTTP2Connection._send_end_stream is gone" in p for p in found), found
    monkeypatch.setattr(h2tuning, "_applied", False)
    monkeypatch.delenv(patchguard.ENV, raising=False)
    with pytest.raises(patchguard.PatchMismatch, match=r"\(and 1 more\)"):
        h2tuning.apply()


def test_unpatched_env_leaves_the_speed_patches_off_with_a_warning(monkeypatch, caplog):
    _bump(monkeypatch, "h2", "9.9.9")
    monkeypatch.setenv(patchguard.ENV, "1")
    monkeypatch.setattr(h2tuning, "_applied", False)
    before = _patched_attributes()
    with caplog.at_level(logging.WARNING, logger="p2pgrid.patchguard"):
        h2tuning.apply()
    assert _patched_attributes() == before
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "h2 9.9.9" in warned[0], warned


def test_unpatched_env_still_needs_the_safety_fixes_symbols(monkeypatch, caplog):
    # stock hypercorn is not safe to serve with (a DATA frame on a closed stream ends the
    # connection), so hypercorn_fixes applies over a bumped version if what it wraps is
    # intact, with a warning, and refuses if not
    from hypercorn.protocol import h2 as hh2
    from hypercorn.trio import tcp_server

    monkeypatch.setenv(patchguard.ENV, "1")
    _bump(monkeypatch, "hypercorn", "0.99.0")
    monkeypatch.setattr(hh2.H2Protocol, "_handle_events", hh2.H2Protocol._handle_events)
    monkeypatch.setattr(tcp_server.TCPServer, "run", tcp_server.TCPServer.run)
    monkeypatch.setattr(hypercorn_fixes, "_applied", False)
    with caplog.at_level(logging.WARNING, logger="p2pgrid.patchguard"):
        hypercorn_fixes.apply()
    assert hypercorn_fixes._applied is True
    assert "hypercorn 0.99.0" in caplog.text
    monkeypatch.setattr(hypercorn_fixes, "_applied", False)
    monkeypatch.setattr(tcp_server.TCPServer, "run", lambda self, extra: None)
    with pytest.raises(patchguard.PatchMismatch, match="TCPServer.run"):
        hypercorn_fixes.apply()


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
    from p2pgrid.testing import open_network

    async with open_network(["a", "b"], tmp_path) as peers:
        from p2pgrid.messages import Ping, Pong

        assert isinstance(await peers["a"].request("b", Ping()), Pong)
    fixes = {"H2Protocol._handle_events", "TCPServer.run"}  # hypercorn_fixes: always on
    for (module, path), obj in _patched_attributes().items():
        ours = getattr(obj, "__module__", "").startswith("p2pgrid.")
        assert ours == (path in fixes), (module, path)


@pytest.mark.xfail(strict=False, reason=(
    "known gap: on a clean CI clone, with the speed patches off, one small PutObject call over "
    "TLS in test_bodies_of_many_sizes_round_trip_intact went unanswered for 120 s (passed in "
    "other runs); stock h2/httpcore with long-lived push/pull streams is not yet proven correct"))
def test_transport_tests_pass_with_the_patches_off(tmp_path):
    # correct, only slower: a subset of the transport and push tests on stock libraries
    env = dict(os.environ, **{patchguard.ENV: "1", "PYTHONPATH": str(ROOT)})
    tests = [
        "tests/test_patchguard.py::test_libraries_stay_stock_when_unpatched",
        "tests/test_transport.py::test_bodies_of_many_sizes_round_trip_intact",
        "tests/test_transport.py::test_large_and_small_requests_share_one_connection",
        "tests/test_transport.py::test_oversized_body_is_refused_and_the_peer_keeps_serving",
        "tests/test_transport.py::test_a_client_pinned_to_the_wrong_certificate_cannot_talk",
        "tests/test_push.py::test_pushes_arrive_in_order_and_intact",
        "tests/test_push.py::test_calls_answer_like_requests",
    ]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


async def test_a_failing_connection_is_logged_with_its_traceback_and_counted(monkeypatch, caplog):
    from hypercorn.protocol import h11

    from p2pgrid import server

    class App:
        connection_failures = hypercorn_fixes.FailureCount()

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
    before = hypercorn_fixes.failures.count
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
    assert hypercorn_fixes.failures.count == before + 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "p2pgrid.server"]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "a patch broke" in caplog.text  # the traceback is in the log
