"""A real ``p2pgrid peer`` process to attack, and the tools of the attacks.

The peer runs as a subprocess (``python -m p2pgrid.cli peer``), fenced by rlimits so
that a flood fits a test (RLIMIT_NOFILE) and an attack that works cannot take the test
machine down with it (RLIMIT_AS, RLIMIT_CPU); what it spends is read from /proc. Its
output goes to a file (a pipe nobody reads would fill and stall the peer). The legitimate caller is a real client
(:class:`p2pgrid.client.Transport`, TLS pinned to the victim's certificate); the
attacker speaks raw TLS and HTTP/2 from another loopback address (all of 127/8 is
local on Linux), so per-address limits can tell them apart as they would on a network.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import trio

import p2pgrid
from p2pgrid import wire
from p2pgrid.auth import sign_request
from p2pgrid.client import Target, Transport, fetch_certificate
from p2pgrid.identity import Identity
from p2pgrid.messages import Ping, Pong

ROOT = Path(p2pgrid.__file__).resolve().parents[1]  # the code under test, wherever it is
ATTACKER = "127.0.0.2"  # the attacker's source address; the legitimate caller uses 127.0.0.1


@dataclass
class Victim:
    proc: subprocess.Popen
    log: Path
    key_id: str
    host: str
    port: int
    console: str | None
    token: str | None
    data_dir: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def seed(self) -> str:
        """What ``--join`` / ``connect(join=[...])`` takes to reach it."""
        return f"{self.key_id}@{self.address}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        """SIGTERM (then SIGKILL); returns what it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.output()


def start(tmp_path: Path, *, name: str = "victim", nofile: int | None = None,
          peer: dict | None = None, extra: str = "", wrap: list[str] = (),
          profile: str | None = None, args: list[str] = (), address_space: int | None = None,
          cpu_seconds: int = 600) -> Victim:
    """Start a peer process; `peer` adds keys to its profile's [peer] table, `extra`
    appends raw TOML (or `profile` is the whole TOML text), `args` go on its command
    line, `wrap` is a command line the peer's is appended to (e.g. to give it a small
    disk); `nofile` and `address_space` cap its file descriptors and memory (its
    workers' too), RLIMIT_CPU ends it should an attack keep it busy regardless.
    Returns once it prints its join line."""
    data = tmp_path / f"{name}-data"
    path = tmp_path / f"{name}.toml"
    if profile is None:
        from dataclasses import fields

        from p2pgrid.config import PeerConfig
        known = {f.name for f in fields(PeerConfig)}
        lines = ["[peer]", f'name = "{name}"', "mdns = false"]
        # keys an older p2pgrid lacks are left out, so these tests can show that it fails
        for k, v in (peer or {}).items():
            if k not in known:
                continue
            lines.append(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"')
        profile = "\n".join(lines) + "\n" + extra
    path.write_text(profile)
    log = tmp_path / f"{name}.log"
    env = dict(os.environ, P2PGRID_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")

    def limit():
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))

    with open(log, "wb") as out:
        proc = subprocess.Popen([*wrap, sys.executable, "-m", "p2pgrid.cli", "peer", "--profile",
                                 str(path), "--no-mdns", "--data-dir", str(data), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                preexec_fn=limit)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = re.search(r"--join (\w+)@([\d.]+):(\d+)", text)
        if m:
            c = re.search(r"console: (\S+)/\s+owner login: \S+token=(\S+)", text)
            return Victim(proc, log, m.group(1), m.group(2), int(m.group(3)),
                          c.group(1) if c else None, c.group(2) if c else None, data)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("peer did not start:\n" + log.read_text(errors="replace"))


class Caller:
    """A legitimate caller: a real Transport with a key of its own."""

    def __init__(self, victim: Victim, name: str | None = None,
                 identity: Identity | None = None):
        self.identity = identity or Identity.generate()
        # a name per key unless given: a name is bound to the first key that uses it
        self.victim, self.name = victim, name or f"alice-{self.identity.key_id[:8]}"
        self.transport = Transport(self.identity, self.name)
        self.target: Target | None = None

    async def request(self, msg, timeout: float = 15.0):
        if self.target is None:
            cert = await fetch_certificate(self.victim.address, timeout=timeout)
            self.target = Target(self.victim.address, self.victim.key_id, cert)
        return await self.transport.request(self.target, msg, timeout=timeout)

    async def ping(self, timeout: float = 15.0) -> float:
        """Seconds a Ping took; raises if it is not answered within `timeout`."""
        t0 = time.monotonic()
        with trio.fail_after(timeout + 5):
            reply = await self.request(Ping(), timeout=timeout)
        assert isinstance(reply, Pong)
        return time.monotonic() - t0

    async def aclose(self) -> None:
        await self.transport.aclose()


def attacker_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the attacker does not care who answers
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def tls_connect(victim: Victim, *, local: str = ATTACKER, handshake: bool = True):
    """A TLS stream to the victim from `local`, handshake done (or only TCP)."""
    sock = trio.socket.socket()
    await sock.bind((local, 0))
    await sock.connect((victim.host, victim.port))
    stream = trio.SocketStream(sock)
    if not handshake:
        return stream
    tls_stream = trio.SSLStream(stream, attacker_context(), server_hostname=None)
    with trio.fail_after(15):  # a peer out of file descriptors never accepts it
        await tls_stream.do_handshake()
    return tls_stream


class H2Attacker:
    """One raw HTTP/2 connection, driven by hand."""

    def __init__(self, stream):
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()

    @classmethod
    async def open(cls, victim: Victim, *, local: str = ATTACKER) -> "H2Attacker":
        self = cls(await tls_connect(victim, local=local))
        await self.flush()
        return self

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def signed_headers(self, victim: Victim, identity: Identity, path: str, length: int,
                       digest: str = "0" * 64) -> list[tuple[str, str]]:
        # a name per key: a second key claiming a bound name is refused at once
        h = sign_request(identity, f"m{identity.key_id}", victim.key_id, "POST", path,
                         digest=digest, now=time.time())
        return [(":method", "POST"), (":authority", victim.address), (":scheme", "https"),
                (":path", path), ("content-length", str(length)),
                ("content-type", "application/cbor"), *h.items()]

    async def start_request(self, headers, body: bytes = b"") -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers)
        if body:
            self.conn.send_data(sid, body)
        await self.flush()
        return sid

    async def pump(self, seconds: float = 0.5) -> list:
        """Read what the peer sends for `seconds` (its settings, window updates,
        replies); returns the h2 events."""
        events = []
        with trio.move_on_after(seconds):
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                events += self.conn.receive_data(data)
                await self.flush()
        return events

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def ping_body() -> bytes:
    return wire.encode(Ping())


# ------------------------------------------------------------------ read from /proc

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()   # fields from the 3rd (state) on


def cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used; 0 if it is gone."""
    f = _stat(pid)
    return 0.0 if f is None or f[0] == "Z" else (int(f[11]) + int(f[12])) / TICK


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f is not None and int(f[1]) == pid and f[0] != "Z":
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    f = _stat(pid)
    return f is not None and f[0] != "Z"


def rss_peak(pid: int) -> int:
    """Bytes of the process's resident peak (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def started(pid: int) -> float:
    """When process `pid` started, in seconds since boot (compare with :func:`uptime`)."""
    f = _stat(pid)
    return float("inf") if f is None else int(f[19]) / TICK


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])
