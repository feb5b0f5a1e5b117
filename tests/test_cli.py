"""The p2pgrid command, as a user runs it: separate processes, real sockets."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "p2pgrid.cli"]


def _env(tmp_path):
    return dict(os.environ, P2PGRID_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")


def _start_peer(tmp_path, *args):
    proc = subprocess.Popen(CLI + ["peer", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(tmp_path), cwd=ROOT)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("join:"):
            seed = line.split("--join", 1)[1].strip()
            return proc, seed, "".join(lines)
    proc.kill()
    raise AssertionError("peer did not start:\n" + "".join(lines))


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


@pytest.mark.parametrize("args", [["--help"], ["peer", "--help"], ["search", "--help"], ["demo", "--help"]])
def test_help_explains_itself(args):
    out = subprocess.run(CLI + args, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "usage: p2pgrid" in out.stdout
    assert len(out.stdout) > 200


def test_peer_search_and_restart(tmp_path):
    data = tmp_path / "hospital-data"
    proc, seed, banner = _start_peer(tmp_path, "--profile", "peers/hospital.toml", "--no-mdns",
                                     "--data-dir", str(data))
    key_id = seed.split("@")[0]
    assert "births-2024-02" in banner
    try:
        out = subprocess.run(CLI + ["search", "#february #birth-records", "--as", "bob", "--join", seed,
                                    "--no-mdns", "--wait", "15"],
                             capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=90)
        assert out.returncode == 0, out.stderr
        # the peer's key fingerprint beside its name: names are trusted on first use here
        assert re.search(rf"hospital\s+{key_id}\s+births-2024-02\s+\(1000, 3\)", out.stdout), out.stdout
        assert "trusted on first use" in out.stdout
        assert "WARNING" in banner and "trusted on first use" in banner
        assert "births-2024-03" not in out.stdout  # march does not match #february
    finally:
        code, tail = _stop(proc)
    assert code == 0 and "peer stopped" in tail
    # a restart keeps the key and the data, and does not publish twice
    proc, seed2, banner2 = _start_peer(tmp_path, "--profile", "peers/hospital.toml", "--no-mdns",
                                       "--data-dir", str(data))
    try:
        assert seed2.split("@")[0] == key_id
        assert banner2.count("births-2024-02") == 1
        assert (data / "identity.key").stat().st_mode & 0o777 == 0o600
    finally:
        _stop(proc)


def test_search_finds_nothing_exits_nonzero(tmp_path):
    out = subprocess.run(CLI + ["search", "#nothing", "--no-mdns", "--wait", "0.5"],
                         capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "nothing matches" in out.stderr


def test_demo_walkthrough(tmp_path):
    out = subprocess.run(CLI + ["demo"], capture_output=True, text=True, env=_env(tmp_path),
                         cwd=ROOT, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PermissionDenied" in out.stdout and "allowed (!)" not in out.stdout
    assert "mean birth weight at the hospital in February" in out.stdout
    # shares among the parties the hospital trusts, and only those
    assert "among hospital,clinic (dealer university)" in out.stdout
    assert out.stdout.count("does not let company") == 2
    assert "Done" in out.stdout


async def test_killed_peer_process_others_still_answer(tmp_path):
    import trio
    import p2pgrid

    fast = ["--no-mdns", "--ttl", "2", "--gossip-interval", "0.2"]
    hosp, hseed, _ = _start_peer(tmp_path, "--profile", "peers/hospital.toml", *fast,
                                 "--data-dir", str(tmp_path / "h"))
    clinic, cseed, _ = _start_peer(tmp_path, "--profile", "peers/clinic.toml", *fast,
                                   "--data-dir", str(tmp_path / "c"), "--join", hseed)
    try:
        async with p2pgrid.connect("bob", join=[hseed], mdns=False, data_dir=tmp_path / "bob",
                                   ttl=2.0, gossip_interval=0.2) as net:
            with trio.fail_after(20):
                while set(await net.search("#birth-records")) != {"hospital", "clinic"}:
                    await trio.sleep(0.1)
            clinic.kill()  # SIGKILL: no goodbye
            clinic.wait()
            hits = await net.search("#february #birth-records")
            assert await hits["hospital"][0][:, 0].mean().get() > 0
            with trio.fail_after(20):
                while "clinic" in await net.search("#birth-records"):
                    await trio.sleep(0.1)
            assert "hospital" in await net.search("#birth-records")
    finally:
        clinic.kill()
        _stop(hosp)
