"""Defaults that work on a LAN (issue 18, item 2): a peer listening on every interface
advertises the real addresses of its interfaces, never a wildcard; a peer on loopback says
at start that it is local-only and how to open it, and announces itself by mDNS only where
it listens."""

import os
import subprocess
import sys
import time
from pathlib import Path


from p2pgrid.config import PeerConfig, interface_ipv4s
from p2pgrid.peer import mdns_interfaces, open_peer

ROOT = Path(__file__).resolve().parent.parent


def _banner(tmp_path, *args) -> str:
    env = dict(os.environ, P2PGRID_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "p2pgrid.cli", "peer", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    lines, deadline = [], time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("join:"):   # the banner's last line
                return "".join(lines)
        raise AssertionError("peer did not start:\n" + "".join(lines))
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_a_peer_on_every_interface_advertises_no_wildcard(tmp_path):
    out = _banner(tmp_path, "--name", "hospital", "--host", "0.0.0.0", "--no-mdns")
    up = next(line for line in out.splitlines() if " up at " in line)
    address = up.split(" up at ", 1)[1].split()[0]
    host, port = address.rsplit(":", 1)
    assert host not in ("0.0.0.0", "::", "") and host in interface_ipv4s(), out
    assert "0.0.0.0" not in out.replace("--host 0.0.0.0", "")
    assert "local only" not in out


def test_a_loopback_peer_says_it_is_local_only(tmp_path):
    out = _banner(tmp_path, "--name", "hospital", "--no-mdns")
    assert "local only" in out and "--host 0.0.0.0" in out, out


async def test_the_record_of_a_wildcard_peer_names_its_interfaces(tmp_path):
    cfg = PeerConfig(name="clinic", host="0.0.0.0", mdns=False, data_dir=tmp_path / "c")
    async with open_peer(cfg) as peer:
        port = peer.address.rsplit(":", 1)[1]
        assert peer.directory.own.addresses == [f"{ip}:{port}" for ip in interface_ipv4s()]
        assert not any(a.startswith(("0.0.0.0:", "[::]:")) for a in peer.directory.own.addresses)
    # mDNS runs where the peer listens: a loopback peer never announces itself on a LAN
    assert mdns_interfaces(PeerConfig(name="x", host="127.0.0.1")) == ["127.0.0.1"]
    assert mdns_interfaces(PeerConfig(name="x", host="0.0.0.0")) is None
    assert mdns_interfaces(PeerConfig(name="x", listen=False)) is None   # browses everywhere
    assert mdns_interfaces(PeerConfig(name="x", mdns_interfaces=("10.0.0.5",))) == ["10.0.0.5"]
