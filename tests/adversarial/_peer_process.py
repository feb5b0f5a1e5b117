"""A real ``p2pgrid peer`` process for attack tests, fenced so that an attack that works
cannot take the test machine down with it, and what it spends, read from /proc."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "p2pgrid.cli"]
TICK = os.sysconf("SC_CLK_TCK")


def start_peer(tmp_path: Path, profile: str, *, address_space: int | None = None,
               cpu_seconds: int = 600) -> tuple[subprocess.Popen, str]:
    """Start a peer from TOML `profile` text; (process, its --join seed).

    `address_space` caps the process and its children with RLIMIT_AS; RLIMIT_CPU
    ends it should an attack keep it busy regardless."""
    path = tmp_path / "peer.toml"
    path.write_text(profile)

    def fence():
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))

    env = dict(os.environ, P2PGRID_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(CLI + ["peer", "--profile", str(path), "--no-mdns", "--data-dir",
                                   str(tmp_path / "peer"), "--gossip-interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT, preexec_fn=fence)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("join:"):
            return proc, line.split("--join", 1)[1].strip()
    proc.kill()
    raise AssertionError("peer did not start:\n" + "".join(lines))


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return out or ""
    return proc.stdout.read() if proc.stdout else ""


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
