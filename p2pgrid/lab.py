"""A network lab: hosts as Linux network namespaces on one emulated LAN, peers as processes.

    with Lab(["hospital", "clinic", "bob"], LinkSpec.parse(delay="20ms")) as lab:
        lab.start_peer("hospital", profile="peers/hospital.toml")
        lab.run("bob", ["p2pgrid", "search", "#birth-records", "--as", "bob"])

Topology. Every lab gets a *switch* namespace ``p2plab-<id>`` and one namespace per host,
``p2plab-<id>-<host>``; nothing is created in the namespace the lab was started from, so
nothing in it can reach an address outside the lab (the hosts have no route out: their only
link is the lab's LAN, 10.77.0.0/24 by default, and no default route). Two link kinds:

- ``veth``: a veth pair per host, its outer end on a bridge (multicast snooping off, so
  mDNS floods) in the switch namespace. Delay, jitter and loss use ``netem`` on the host's
  egress when the kernel has it; rate uses ``tbf`` on both ends.
- ``vde``: when delay, jitter or loss are asked for and the kernel has no ``netem``, each
  host gets a persistent TAP device wired by Debian's vde tools to a userspace switch:
  ``ip netns exec NS vde_plug tap://eth0 switch://PORT`` and ``wirefilter -v PORT:SW -d LR<ms>``.
  The filter delays one direction only, so a packet from A to B crosses one delay
  (A's link out or B's link in), like ``netem`` on egress. Rate uses ``tbf`` on the TAP.

A host's link is *cut* by downing its switch port (veth) or unplugging its wire (vde: the
wire's processes end, the TAP stays with its addresses), and restored likewise.

Cleanup. Each lab records its owner pid and the process groups it started under
``/run/p2plab/<id>``; :func:`cleanup_stale` (called by every start) removes the namespaces,
processes and files of labs whose owner is gone, so an interrupted run leaves nothing
behind for long. Needs root; :func:`unsupported_reason` says why a lab cannot run here.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["LinkSpec", "Lab", "LabPeer", "LabError", "unsupported_reason", "has_netem",
           "cleanup_stale", "PREFIX", "host_ns", "ns_address", "ns_tx_bytes"]

PREFIX = "p2plab"
REPO = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^[a-z][a-z0-9]{0,23}$")
_UP_LINE = re.compile(r"^peer (\S+) up at (\S+) \(key (\S+)\)")


class LabError(RuntimeError):
    """The lab could not be set up or a host command failed."""


def run_root() -> Path:
    return Path(os.environ.get("P2PLAB_RUN", "/run/p2plab"))


# --- what this machine can do ------------------------------------------------------------

def unsupported_reason() -> str | None:
    """None when labs can run here, else one line saying why not."""
    if not sys.platform.startswith("linux"):
        return "the network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth, tc); run as root"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"the network lab needs `{tool}` (Debian package iproute2)"
    return None


def vde_missing() -> str | None:
    """None when the vde tools (userspace delay/loss) are installed, else what is missing."""
    missing = [t for t in ("vde_plug", "wirefilter") if not shutil.which(t)]
    if missing:
        return (f"delay/loss emulation needs netem or the vde tools ({', '.join(missing)} missing: "
                "apt-get install --no-install-recommends vdeplug vde-wirefilter)")
    return None


@lru_cache(maxsize=1)
def has_netem() -> bool:
    """Whether this kernel has the ``netem`` qdisc (tried in a throwaway namespace)."""
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-n", "sh", "-c",
                        "ip link set lo up && tc qdisc add dev lo root netem delay 1ms"],
                       capture_output=True, timeout=20)
    return r.returncode == 0


# --- link parameters ---------------------------------------------------------------------

def _ms(text: str | float | None) -> float:
    if text is None or text == "":
        return 0.0
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)?\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 20ms, 0.5s)")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, None: 1.0}[m.group(2)]


def _pct(text: str | float | None) -> float:
    if text is None or text == "":
        return 0.0
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*%?\s*", text)
    if not m:
        raise ValueError(f"not a percentage: {text!r} (e.g. 0.1%)")
    return float(m.group(1))


def _bits(text: str | int | None) -> int | None:
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)(bit|bps)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a rate: {text!r} (e.g. 100mbit, 1gbit)")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)])


@dataclass(frozen=True)
class LinkSpec:
    """What each host's link to the LAN does to the packets it carries (one-way figures)."""
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_bit: int | None = None

    @classmethod
    def parse(cls, delay=None, jitter=None, loss=None, rate=None) -> "LinkSpec":
        """From command-line style values: ``20ms``, ``2ms``, ``0.1%``, ``100mbit``."""
        spec = cls(_ms(delay), _ms(jitter), _pct(loss), _bits(rate))
        if spec.jitter_ms and not spec.delay_ms:
            raise ValueError("--jitter needs a --delay")
        if not 0 <= spec.loss_pct <= 100:
            raise ValueError("--loss must be between 0% and 100%")
        return spec

    @property
    def shaped(self) -> bool:
        """Whether delay, jitter or loss are asked for (rate alone needs no emulator)."""
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct)

    def describe(self) -> str:
        parts = []
        if self.delay_ms:
            parts.append(f"delay {self.delay_ms:g}ms" + (f"±{self.jitter_ms:g}ms" if self.jitter_ms else ""))
        if self.loss_pct:
            parts.append(f"loss {self.loss_pct:g}%")
        if self.rate_bit:
            parts.append(f"rate {self.rate_bit / 1e6:g}mbit")
        return ", ".join(parts) or "no shaping"


# --- processes and commands --------------------------------------------------------------

def _sh(argv: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip()}")
    return r


def _netns_list() -> list[str]:
    r = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _kill_netns_processes(ns: str) -> None:
    """SIGKILL whatever still runs in a namespace (else it outlives ``ip netns del``)."""
    for _ in range(3):
        r = _sh(["ip", "netns", "pids", ns], check=False)
        pids = [int(p) for p in r.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _killpg(pgid: int, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(lab_dir: Path) -> bool:
    try:
        pid_s, start = (lab_dir / "owner").read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid_s)) == start


def _destroy(lab_id: str, lab_dir: Path | None) -> None:
    if lab_dir is not None:
        for line in _read_lines(lab_dir / "pgids"):
            if line.isdigit():
                _killpg(int(line))
    mine = [ns for ns in _netns_list() if ns == f"{PREFIX}-{lab_id}" or ns.startswith(f"{PREFIX}-{lab_id}-")]
    for ns in mine:
        _kill_netns_processes(ns)
    for ns in mine:
        _sh(["ip", "netns", "del", ns], check=False)
    if lab_dir is not None:
        shutil.rmtree(lab_dir, ignore_errors=True)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def cleanup_stale() -> list[str]:
    """Tear down labs whose owning process is gone (an interrupted run); returns their ids."""
    if unsupported_reason():
        return []
    root = run_root()
    gone = []
    live_ids = set()
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir():
                if _owner_alive(d):
                    live_ids.add(d.name)
                else:
                    _destroy(d.name, d)
                    gone.append(d.name)
    # namespaces whose record was lost (its directory removed by hand)
    for ns in _netns_list():
        if ns.startswith(PREFIX + "-"):
            lab_id = ns[len(PREFIX) + 1:].split("-", 1)[0]
            if lab_id not in live_ids and lab_id not in gone:
                _destroy(lab_id, None)
                gone.append(lab_id)
    return gone


# --- the lab -----------------------------------------------------------------------------

@dataclass
class Host:
    name: str
    index: int
    ns: str
    address: str
    port_name: str                      # its link's end in the switch namespace (veth)
    tap: subprocess.Popen | None = None   # vde: its TAP's own switch, in its namespace
    wire: subprocess.Popen | None = None  # vde: the wirefilter joining that to the LAN's switch
    cut: bool = False


@dataclass
class LabPeer:
    """A ``p2pgrid peer`` process running in a lab host."""
    host: str
    name: str
    proc: subprocess.Popen
    log: Path
    address: str = ""
    key_id: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def join(self) -> str:
        """``KEYID@HOST:PORT``, for ``--join``."""
        return f"{self.key_id}@{self.address}"

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Lab:
    """N hosts on one emulated LAN. Use as a context manager, or ``start()``/``close()``."""

    def __init__(self, hosts, link: LinkSpec = LinkSpec(), *, lab_id: str | None = None,
                 subnet: str = "10.77.0", python: str | None = None, emulator: str = "auto",
                 sysctls: dict[str, str] | None = None):
        names = list(hosts)
        # per-namespace kernel settings for every host (net.* sysctls are per namespace)
        self.sysctls = dict(sysctls or {})
        for key in self.sysctls:
            if not re.fullmatch(r"net\.[a-z0-9_.]+", key):
                raise ValueError(f"sysctl {key!r}: only net.* settings, which stay in the lab")
        if not names:
            raise ValueError("a lab needs at least one host")
        for n in names:
            if not _NAME.match(n):
                raise ValueError(f"host name {n!r}: lower-case letters and digits, at most 24")
        if len(set(names)) != len(names):
            raise ValueError("host names must differ")
        if len(names) > 200:
            raise ValueError("at most 200 hosts")
        self.id = lab_id or secrets.token_hex(3)
        if not re.fullmatch(r"[a-z0-9]{1,8}", self.id):
            raise ValueError("lab id: lower-case letters and digits, at most 8")
        self.link = link
        self.python = python or sys.executable
        self.dir = run_root() / self.id
        self.switch_ns = f"{PREFIX}-{self.id}"
        self.hosts = {n: Host(n, i, f"{PREFIX}-{self.id}-{n}", f"{subnet}.{i + 10}", f"h{i}")
                      for i, n in enumerate(names)}
        self.subnet = subnet
        self.emulator = emulator
        self.kind = "veth"
        self._procs: list[subprocess.Popen] = []
        self._started = False

    # lifecycle

    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Lab":
        """Create the switch, the hosts and their links. Cleans up stale labs first."""
        reason = unsupported_reason()
        if reason:
            raise LabError(reason)
        cleanup_stale()
        if self.dir.exists() or self.switch_ns in _netns_list():
            raise LabError(f"a lab with id {self.id!r} is running (stop it, or pick another id)")
        self.kind = self._pick_kind()
        self.dir.mkdir(parents=True, mode=0o700)
        pid = os.getpid()
        (self.dir / "owner").write_text(f"{pid} {_start_time(pid)}\n")
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _pick_kind(self) -> str:
        if self.emulator in ("veth", "vde"):
            kind = self.emulator
        elif not self.link.shaped or has_netem():
            kind = "veth"
        else:
            kind = "vde"
        if kind == "vde":
            missing = vde_missing()
            if missing:
                raise LabError(missing)
        elif self.link.shaped and not has_netem():
            raise LabError("this kernel has no netem qdisc: use the vde emulator")
        return kind

    def _build(self) -> None:
        sw = self.switch_ns
        _sh(["ip", "netns", "add", sw])
        _sh(["ip", "-n", sw, "link", "set", "lo", "up"])
        if self.kind == "veth":
            _sh(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
            _sh(["ip", "-n", sw, "link", "set", "br0", "up"])
        else:
            self._switch = self._track(subprocess.Popen(
                ["vde_plug", "null://", f"switch://{self.dir}/sw"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=open(self.dir / "switch.log", "wb"),
                start_new_session=True))
            _wait_for(lambda: (self.dir / "sw" / "ctl").exists(), 10, "the vde switch did not start")
        for h in self.hosts.values():
            self._add_host(h)

    def _add_host(self, h: Host) -> None:
        ns, sw = h.ns, self.switch_ns
        _sh(["ip", "netns", "add", ns])
        _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        if self.kind == "veth":
            _sh(["ip", "-n", sw, "link", "add", h.port_name, "type", "veth",
                 "peer", "name", "eth0", "netns", ns])
            _sh(["ip", "-n", sw, "link", "set", h.port_name, "master", "br0"])
            _sh(["ip", "-n", sw, "link", "set", h.port_name, "up"])
        else:
            _sh(["ip", "-n", ns, "tuntap", "add", "dev", "eth0", "mode", "tap"])
        _sh(["ip", "-n", ns, "addr", "add", f"{h.address}/24", "dev", "eth0"])
        _sh(["ip", "-n", ns, "link", "set", "eth0", "multicast", "on", "up"])
        # mDNS sends to 224.0.0.251; with no default route the group needs its own
        _sh(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])
        for key, value in self.sysctls.items():
            _sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])
        self._shape(h)
        if self.kind == "vde":
            self._plug(h)
            _wait_for(lambda: "LOWER_UP" in _sh(["ip", "-n", ns, "link", "show", "eth0"]).stdout,
                      10, f"{h.name}'s link did not come up")

    def _shape(self, h: Host) -> None:
        spec = self.link
        if self.kind == "veth" and spec.shaped:
            args = ["delay", f"{spec.delay_ms:g}ms"]
            if spec.jitter_ms:
                args += [f"{spec.jitter_ms:g}ms"]
            if spec.loss_pct:
                args += ["loss", f"{spec.loss_pct:g}%"]
            if spec.rate_bit:
                args += ["rate", f"{spec.rate_bit}bit"]
            _sh(["ip", "netns", "exec", h.ns, "tc", "qdisc", "replace", "dev", "eth0", "root",
                 "netem", *args])
        elif spec.rate_bit:
            _sh(["ip", "netns", "exec", h.ns, "tc", "qdisc", "replace", "dev", "eth0", "root",
                 *_tbf(spec.rate_bit)])
        if self.kind == "veth" and spec.rate_bit:  # the host's download: the switch port's egress
            _sh(["ip", "netns", "exec", self.switch_ns, "tc", "qdisc", "replace", "dev",
                 h.port_name, "root", *_tbf(spec.rate_bit)])

    def _plug(self, h: Host) -> None:
        # The host's TAP gets a switch of its own (a process in the host's namespace); a
        # wirefilter joins it to the LAN's switch over their unix sockets. (A dpipe chain
        # through stdin/stdout stalls one direction when both are busy, as in SMPC rounds.)
        spec = self.link
        port = self.dir / f"port-{h.name}"
        if h.tap is None or h.tap.poll() is not None:
            h.tap = self._track(subprocess.Popen(
                ["ip", "netns", "exec", h.ns, "vde_plug", "tap://eth0", f"switch://{port}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(self.dir / f"tap-{h.name}.log", "ab"), start_new_session=True))
            _wait_for(lambda: (port / "ctl").exists(), 10, f"{h.name}'s port did not start")
        # a queue deep enough for a burst at full speed across the delay: wirefilter drops
        # what does not fit, and lost SYNs cost TCP seconds of backoff
        wf = ["wirefilter", "-v", f"{port}:{self.dir}/sw", "-c", str(64 << 20)]
        if spec.delay_ms:
            d = f"LR{spec.delay_ms:g}"
            if spec.jitter_ms:
                d += f"+{spec.jitter_ms:g}U"
            wf += ["-d", d]
        if spec.loss_pct:
            wf += ["-l", f"LR{spec.loss_pct:g}"]
        # with -v, wirefilter reads management commands from stdin and ends at its EOF:
        # the pipe stays open until we end it
        h.wire = self._track(subprocess.Popen(
            wf, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=open(self.dir / f"wire-{h.name}.log", "ab"), start_new_session=True))

    def _track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self._procs.append(proc)
        with open(self.dir / "pgids", "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def close(self) -> None:
        """Stop every process, remove every namespace, link and file of this lab."""
        if not self._started:
            return
        self._started = False
        for p in reversed(self._procs):
            if p.poll() is None:
                _killpg(p.pid, signal.SIGTERM)
            if p.stdin is not None:
                p.stdin.close()
        deadline = time.monotonic() + 5
        for p in reversed(self._procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(p.pid)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _destroy(self.id, self.dir)

    # hosts

    def ns(self, host: str) -> str:
        return self.hosts[host].ns

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def env(self, host: str, extra: dict | None = None) -> dict:
        """Environment for commands on a host: this checkout's code, a home of the host's own."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["P2PGRID_HOME"] = str(self.dir / "home" / host)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if extra:
            env.update(extra)
        return env

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``; a leading ``p2pgrid`` runs this checkout's CLI."""
        if argv and argv[0] == "p2pgrid":
            argv = [self.python, "-m", "p2pgrid.cli", *argv[1:]]
        elif argv and argv[0] == "python":
            argv = [self.python, *argv[1:]]
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], *, timeout: float = 60, check: bool = False,
            input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command on a host to completion (output captured, text)."""
        r = subprocess.run(self.argv(host, argv), capture_output=True, text=True, input=input,
                           timeout=timeout, env=self.env(host, env), cwd=REPO)
        if check and r.returncode != 0:
            raise LabError(f"{host}: {' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r

    def spawn(self, host: str, argv: list[str], *, log: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        """Start a long-running command on a host, its output in the lab's ``log`` file."""
        path = self.dir / "logs" / f"{log}.log"
        path.parent.mkdir(exist_ok=True)
        out = open(path, "ab")
        proc = self._track(subprocess.Popen(self.argv(host, argv), stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, env=self.env(host, env),
                                            cwd=REPO, start_new_session=True))
        return proc, path

    def start_peer(self, host: str, *, name: str | None = None, profile: str | Path | None = None,
                   args: list[str] = (), timeout: float = 90, env: dict | None = None) -> LabPeer:
        """``p2pgrid peer`` on a host (named after it unless ``name``); waits until it is up."""
        return self.wait_up(self.spawn_peer(host, name=name, profile=profile, args=args, env=env),
                            timeout)

    def start_peers(self, specs: dict[str, dict], timeout: float = 120) -> dict[str, LabPeer]:
        """Several peers at once (their imports overlap): ``{host: spawn_peer kwargs}``."""
        spawned = {host: self.spawn_peer(host, **kw) for host, kw in specs.items()}
        return {host: self.wait_up(p, timeout) for host, p in spawned.items()}

    def spawn_peer(self, host: str, *, name: str | None = None, profile: str | Path | None = None,
                   args: list[str] = (), env: dict | None = None) -> LabPeer:
        """Start ``p2pgrid peer`` on a host without waiting; see :meth:`wait_up`."""
        name = name or host
        argv = ["p2pgrid", "peer", "--name", name]
        if profile:
            argv += ["--profile", str(profile)]
        argv += list(args)
        proc, log = self.spawn(host, argv, log=f"peer-{host}-{name}", env=env)
        return LabPeer(host, name, proc, log)

    def wait_up(self, peer: LabPeer, timeout: float = 90) -> LabPeer:
        """Wait for a peer's "up at" line; fills in its address and key id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in peer.output().splitlines():
                m = _UP_LINE.match(line)
                if m:
                    peer.address, peer.key_id = m.group(2), m.group(3)
                    return peer
            if peer.proc.poll() is not None:
                raise LabError(f"peer {peer.name} on {peer.host} exited {peer.proc.returncode}: "
                               f"{peer.output()[-2000:]}")
            time.sleep(0.1)
        raise LabError(f"peer {peer.name} on {peer.host} did not come up in {timeout:g}s: "
                       f"{peer.output()[-2000:]}")

    def stop(self, proc: subprocess.Popen, timeout: float = 10) -> int | None:
        """Stop a process started by :meth:`spawn` (SIGTERM, then SIGKILL)."""
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid)
                proc.wait(timeout=5)
        return proc.returncode

    # links

    def cut(self, host: str) -> None:
        """Disconnect a host from the LAN (its interface stays configured, like a pulled cable)."""
        h = self.hosts[host]
        if h.cut:
            return
        if self.kind == "veth":
            _sh(["ip", "-n", self.switch_ns, "link", "set", h.port_name, "down"])
        else:
            _killpg(h.wire.pid, signal.SIGTERM)
            h.wire.wait(timeout=10)
            h.wire.stdin.close()
        h.cut = True

    def restore(self, host: str) -> None:
        """Reconnect a host cut by :meth:`cut`."""
        h = self.hosts[host]
        if not h.cut:
            return
        if self.kind == "veth":
            _sh(["ip", "-n", self.switch_ns, "link", "set", h.port_name, "up"])
        else:
            self._plug(h)
        _wait_for(lambda: "LOWER_UP" in _sh(["ip", "-n", h.ns, "link", "show", "eth0"]).stdout,
                  10, f"{host}'s link did not come back")
        h.cut = False


def _tbf(rate_bit: int) -> list[str]:
    # the bucket must hold a whole GSO segment (64 KiB) and a few ms of traffic at the rate
    burst = max(rate_bit // 8 // 250, 128 * 1024)
    return ["tbf", "rate", f"{rate_bit}bit", "burst", str(burst), "latency", "100ms"]


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise LabError(what)
        time.sleep(0.05)


# --- helpers for code running inside a lab host (benchmarks) ------------------------------

def host_ns(lab_id: str, host: str) -> str:
    """The namespace of ``host`` in lab ``lab_id``."""
    return f"{PREFIX}-{lab_id}-{host}"


def ns_address(ns: str) -> str:
    """The LAN (IPv4) address of a lab namespace's eth0."""
    out = _sh(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.split()
    return out[out.index("inet") + 1].split("/")[0]


def ns_tx_bytes(ns: str) -> int:
    """Bytes a lab namespace has sent on its LAN link (all traffic: TLS, HTTP/2, gossip, mDNS)."""
    out = _sh(["ip", "-n", ns, "-s", "-o", "link", "show", "dev", "eth0"]).stdout
    # one line: ... RX: bytes packets ... \    <rx values> \    TX: bytes ... \    <tx values>
    parts = [p.split() for p in out.split("\\")]
    for i, p in enumerate(parts):
        if p and p[0] == "TX:":
            return int(parts[i + 1][0])
    raise LabError(f"no TX counters for {ns}")
