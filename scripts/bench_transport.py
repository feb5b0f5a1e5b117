"""Transport benchmark: request round trip and tensor throughput between two peer processes.

    python scripts/bench_transport.py                      # TLS and h2c, 1/32/256 MB
    python scripts/bench_transport.py --insecure           # h2c only
    python scripts/bench_transport.py --sizes 1,32 --rounds 5 --pings 2000
    python scripts/bench_transport.py --tls-only --sizes 256 --rounds 7 --pings 200   # the ratio

The parent process starts a *server peer* in a child process (this script with
``--serve``), then runs a *client peer* that joins it by ``KEYID@host:port``
and, once the directory knows the server, measures:

- ``ping_ms``: ``peer.request(server, Ping())`` round trips (p50, p99, mean),
  and the CPU time each process spent per round trip (``cpu_ms_client``,
  ``cpu_ms_server``): on a shared machine the steadier number. A small request
  travels as a call on the push streams (see ``p2pgrid.calls``);
- ``http_ms``: the same with ``via="http"``: an HTTP/2 request of its own, the
  path large messages take;
- ``upload_MBps``: ``PutObject`` of an N MB uint8 tensor (the reply comes after
  the server has verified, decoded and stored it);
- ``download_MBps``: ``GetObject`` of that stored object: a small request whose
  reply, from 1 MiB up, the server holds for the client to fetch with a request
  (see ``p2pgrid.calls``), so the time includes that extra round trip;
- ``*_cpu_ms_per_MB``: CPU time per MB moved, per process, all threads;
- ``raw``: the baselines, the same sizes moved over a plain socket between two
  processes with blocking ``sendall``/``recv_into`` (``tcp``) and over TLS with the
  same kind of certificate, pinning and TLS 1.3 as the peers (``tls``: Python's ``ssl``
  module, the fastest a Python process moves bytes through OpenSSL), each with its CPU
  time per MB;
- ``ratio``: p2pgrid's TLS throughput over the raw TLS socket's, upload and download,
  per size, median over median; ``ratio_mean``: mean over mean (the first, cold,
  transfer of each included). The target is >= 0.5 for both.

Measuring starts once both peers are idle (plugins warm up in threads when a
peer starts). Throughput is the median over ``--rounds`` (MB = 10**6 bytes), and
``*_MBps_mean`` the mean, the first transfer included. Both peers keep
their stores under ``--data-dir`` (default: /dev/shm when it exists), so a
disk's fsync does not hide the transport. One JSON object goes to stdout,
progress to stderr. ``--profile DIR`` writes cProfile stats of both processes
(``server.pstats``, ``client.pstats``) for each mode.

Run it where nothing else uses the loopback, e.g.
``unshare -rn sh -c 'ip link set lo up; python scripts/bench_transport.py'``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

import p2pgrid

from p2pgrid.config import PeerConfig
from p2pgrid.errors import NotFound
from p2pgrid.messages import DeleteObject, GetObject, Ping, PutObject, Value

MB = 1_000_000


def _log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ------------------------------------------------------------------ server process

async def _serve(args) -> None:
    cfg = PeerConfig(name="bench-server", data_dir=args.data_dir, mdns=False,
                     insecure=args.insecure, gossip_interval=0.2, ttl=30.0,
                     max_body=2 << 30, store_quota_bytes=1 << 40, store_total_bytes=1 << 40)
    async with p2pgrid.open_peer(cfg) as peer:
        # the client is not registered here: let anyone store (the owner's setting)
        from p2pgrid.governance import policy
        policy.of(peer).store.set_setting("store_objects", "anyone", by="bench")
        print(json.dumps({"address": peer.address, "key_id": peer.key_id}), flush=True)
        # Serve until the parent closes our stdin.
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


# ------------------------------------------------------------------ client process

async def _wait_known(peer, name: str, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                peer.record(name)
                return
            except NotFound:
                await trio.sleep(0.05)


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds used by a process, all its threads (this one by default)."""
    if pid is None:
        return time.process_time()
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():  # ns, per thread (stat has 10 ms ticks)
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


async def _settle(server_pid: int, timeout: float = 60.0) -> float:
    """Wait until neither peer is busy (plugins warm up in threads at start)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        before = _cpu_s(), _cpu_s(server_pid)
        await trio.sleep(0.5)
        if _cpu_s() - before[0] < 0.05 and _cpu_s(server_pid) - before[1] < 0.05:
            break
    return time.perf_counter() - t0


async def _measure(args, seed: str, data_dir: Path, server_pid: int) -> dict:
    cfg = PeerConfig(name="bench-client", data_dir=data_dir, mdns=False, join=(seed,),
                     insecure=args.insecure, gossip_interval=0.2, ttl=30.0, max_body=2 << 30)
    out: dict = {}
    async with p2pgrid.open_peer(cfg) as peer:
        await _wait_known(peer, "bench-server")
        server = "bench-server"
        _log(f"  peers idle after {await _settle(server_pid):.1f} s")

        async def http(to, msg):
            return await peer.request(to, msg, via="http")
        paths = {"request": ("ping_ms", peer.request), "http": ("http_ms", http)}
        timed = [paths[p] for p in args.paths] if args.pings > 0 else []  # --pings 0: transfers only
        for key, send in timed:
            for _ in range(min(200, args.pings)):  # warm up: connection, caches
                await send(server, Ping())
            rtts = []
            cpu0 = _cpu_s(), _cpu_s(server_pid)
            for _ in range(args.pings):
                t0 = time.perf_counter()
                await send(server, Ping())
                rtts.append((time.perf_counter() - t0) * 1e3)
            cpu1 = _cpu_s(), _cpu_s(server_pid)
            out[key] = {"p50": round(_percentile(rtts, 50), 3),
                        "p99": round(_percentile(rtts, 99), 3),
                        "mean": round(statistics.fmean(rtts), 3), "n": len(rtts),
                        # CPU each process spent per round trip: the floor on this machine
                        "cpu_ms_client": round((cpu1[0] - cpu0[0]) * 1e3 / len(rtts), 3),
                        "cpu_ms_server": round((cpu1[1] - cpu0[1]) * 1e3 / len(rtts), 3)}
            _log(f"  {key} {out[key]}")

        for size_mb in args.sizes:
            n = int(size_mb * MB)
            tensor = torch.randint(0, 256, (n,), dtype=torch.uint8)
            ups, downs, cpu_up, cpu_down = [], [], [], []
            for r in range(args.rounds):
                c0, t0 = (_cpu_s(), _cpu_s(server_pid)), time.perf_counter()
                info = await peer.request(server, PutObject(tensor))
                c1, t1 = (_cpu_s(), _cpu_s(server_pid)), time.perf_counter()
                reply = await peer.request(server, GetObject(info.meta["id"]))
                c2, t2 = (_cpu_s(), _cpu_s(server_pid)), time.perf_counter()
                assert isinstance(reply, Value) and reply.value.numel() == n
                if r == 0:
                    assert torch.equal(reply.value, tensor), "downloaded tensor differs"
                del reply
                await peer.request(server, DeleteObject(info.meta["id"]))
                ups.append(n / MB / (t1 - t0))
                downs.append(n / MB / (t2 - t1))
                cpu_up.append([(c1[i] - c0[i]) * 1e3 / (n / MB) for i in (0, 1)])
                cpu_down.append([(c2[i] - c1[i]) * 1e3 / (n / MB) for i in (0, 1)])
            key = f"{size_mb:g}MB"
            out.setdefault("upload_MBps", {})[key] = round(statistics.median(ups), 1)
            out.setdefault("download_MBps", {})[key] = round(statistics.median(downs), 1)
            out.setdefault("upload_MBps_mean", {})[key] = round(statistics.fmean(ups), 1)
            out.setdefault("download_MBps_mean", {})[key] = round(statistics.fmean(downs), 1)
            # CPU time per MB moved, per process (all threads; sender/receiver
            # work, encoding, hashing, the store): what bounds throughput when the
            # machine is not shared.
            for name, samples in (("upload", cpu_up), ("download", cpu_down)):
                out.setdefault(f"{name}_cpu_ms_per_MB", {})[key] = {
                    "client": round(statistics.median(c for c, _ in samples), 2),
                    "server": round(statistics.median(s for _, s in samples), 2)}
            _log(f"  {key}: up {[round(x) for x in ups]} MB/s, down {[round(x) for x in downs]} MB/s; "
                 f"cpu ms/MB up {out['upload_cpu_ms_per_MB'][key]}, "
                 f"down {out['download_cpu_ms_per_MB'][key]}")
    return out


# ------------------------------------------------------------------ raw socket baselines

_OP = struct.Struct(">cQ")  # b"U" (upload: that many bytes follow, answered b"k") or b"D"
_CHUNK = 1 << 20            # per sendall/recv_into: Python's ssl writes at most 2 GB a call


def _raw_certificate(root: Path) -> bytes:
    """A throwaway identity's certificate, the kind the peers use, with its PEM files
    (tls-cert.pem, tls-key.pem) under root/raw-tls for the server process."""
    from p2pgrid import tls
    from p2pgrid.identity import Identity

    identity = Identity.generate()
    cert = tls.make_certificate(identity)
    tls.server_context_files(identity, cert, root / "raw-tls")
    return cert


def _raw_server_context(root: Path):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(root / "raw-tls" / "tls-cert.pem", root / "raw-tls" / "tls-key.pem")
    return context


def _recv_exactly(sock, view: memoryview) -> None:
    at = 0
    while at < len(view):
        got = sock.recv_into(view[at:at + _CHUNK])
        if not got:
            raise ConnectionError("the other side closed mid-transfer")
        at += got


def _send_all(sock, view: memoryview) -> None:
    for at in range(0, len(view), _CHUNK):
        sock.sendall(view[at:at + _CHUNK])


def _raw_serve(args) -> None:
    """Child process: accept one connection, then serve uploads and downloads on it."""
    import socket

    sock = socket.create_server(("127.0.0.1", 0))
    context = None
    if args.raw_serve == "tls":
        context = _raw_server_context(Path(args.data_dir))
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    conn, _ = sock.accept()
    if context is not None:
        conn = context.wrap_socket(conn, server_side=True)
    buf = memoryview(bytearray(int(max(args.sizes) * MB)))
    head = memoryview(bytearray(_OP.size))
    while True:
        try:
            _recv_exactly(conn, head)
        except (ConnectionError, OSError):
            return
        op, n = _OP.unpack(head)
        if op == b"U":
            _recv_exactly(conn, buf[:n])
            conn.sendall(b"k")
        else:
            _send_all(conn, buf[:n])


def _raw_run(args, kind: str, root: Path) -> dict:
    """Upload and download each size over a raw `kind` ("tcp" or "tls") socket to a
    child process; throughput as for the peers, and CPU per MB of both processes."""
    import socket

    from p2pgrid import tls

    cert = _raw_certificate(root) if kind == "tls" else None
    cmd = [sys.executable, os.path.abspath(__file__), "--raw-serve", kind, "--data-dir",
           str(root), "--sizes", ",".join(f"{x:g}" for x in args.sizes)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    out: dict = {}
    try:
        port = json.loads(proc.stdout.readline())["port"]
        conn = socket.create_connection(("127.0.0.1", port))
        if kind == "tls":
            # the client's side exactly as a peer's: pinned to the one certificate
            conn = tls.client_context(cert).wrap_socket(conn, server_hostname=None)
        data = memoryview(torch.randint(0, 256, (int(max(args.sizes) * MB),),
                                        dtype=torch.uint8).numpy())
        back = memoryview(bytearray(len(data)))
        ack = memoryview(bytearray(1))
        for size_mb in args.sizes:
            n = int(size_mb * MB)
            ups, downs, cpu_up, cpu_down = [], [], [], []
            for _ in range(args.rounds):
                c0, t0 = (_cpu_s(), _cpu_s(proc.pid)), time.perf_counter()
                conn.sendall(_OP.pack(b"U", n))
                _send_all(conn, data[:n])
                _recv_exactly(conn, ack)
                c1, t1 = (_cpu_s(), _cpu_s(proc.pid)), time.perf_counter()
                conn.sendall(_OP.pack(b"D", n))
                _recv_exactly(conn, back[:n])
                c2, t2 = (_cpu_s(), _cpu_s(proc.pid)), time.perf_counter()
                ups.append(n / MB / (t1 - t0))
                downs.append(n / MB / (t2 - t1))
                cpu_up.append([(c1[i] - c0[i]) * 1e3 / (n / MB) for i in (0, 1)])
                cpu_down.append([(c2[i] - c1[i]) * 1e3 / (n / MB) for i in (0, 1)])
            key = f"{size_mb:g}MB"
            out.setdefault("upload_MBps", {})[key] = round(statistics.median(ups), 1)
            out.setdefault("download_MBps", {})[key] = round(statistics.median(downs), 1)
            out.setdefault("upload_MBps_mean", {})[key] = round(statistics.fmean(ups), 1)
            out.setdefault("download_MBps_mean", {})[key] = round(statistics.fmean(downs), 1)
            for name, samples in (("upload", cpu_up), ("download", cpu_down)):
                out.setdefault(f"{name}_cpu_ms_per_MB", {})[key] = {
                    "client": round(statistics.median(c for c, _ in samples), 2),
                    "server": round(statistics.median(s for _, s in samples), 2)}
            _log(f"  raw {kind} {key}: up {[round(x) for x in ups]} MB/s, "
                 f"down {[round(x) for x in downs]} MB/s")
        conn.close()
    finally:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def _ratios(tls: dict, raw: dict, stat: str = "") -> dict:
    return {way: {size: round(tls[f"{way}_MBps{stat}"][size] / raw[f"{way}_MBps{stat}"][size], 3)
                  for size in raw[f"{way}_MBps{stat}"]}
            for way in ("upload", "download")}


def _run_mode(args, insecure: bool, root: Path) -> dict:
    mode = "h2c" if insecure else "tls"
    _log(f"[{mode}]")
    server_dir, client_dir = Path(tempfile.mkdtemp(dir=root)), Path(tempfile.mkdtemp(dir=root))
    cmd = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--serve",
           "--data-dir", str(server_dir)] + (["--insecure"] if insecure else [])
    if args.profile:
        cmd += ["--profile", str(Path(args.profile) / mode)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("server process failed to start")
        hello = json.loads(line)
        args.insecure = insecure
        profile = _profiler(args.profile and Path(args.profile) / mode / "client.pstats")
        with profile:
            res = trio.run(_measure, args, f"{hello['key_id']}@{hello['address']}", client_dir,
                           proc.pid)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return res


class _profiler:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        if self.path:
            import cProfile
            self.prof = cProfile.Profile()
            self.prof.enable()

    def __exit__(self, *exc):
        if self.path:
            self.prof.disable()
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.prof.dump_stats(self.path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,32,256",
                    help="tensor sizes in MB (10**6 bytes), comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="transfers per size and direction")
    ap.add_argument("--pings", type=int, default=1000,
                    help="timed Ping round trips (0: none, transfers only)")
    ap.add_argument("--paths", default="request,http",
                    help="which round trips to time: request (as peer.request sends a small "
                         "message), http (an HTTP/2 request each), or both (comma-separated)")
    ap.add_argument("--insecure", action="store_true", help="h2c only (no TLS)")
    ap.add_argument("--tls-only", action="store_true", help="TLS only")
    ap.add_argument("--data-dir", default=None, help="where the peers keep their stores")
    ap.add_argument("--profile", default=None, help="write cProfile stats of both peers here")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw TCP and TLS baselines")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raw-serve", choices=("tcp", "tls"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.raw_serve:
        args.sizes = [float(s) for s in args.sizes.split(",") if s]
        _raw_serve(args)
        return

    if args.serve:
        with _profiler(args.profile and Path(args.profile) / "server.pstats"):
            trio.run(_serve, args)
        return

    args.sizes = [float(s) for s in args.sizes.split(",") if s]
    args.paths = [p for p in args.paths.split(",") if p]
    if not set(args.paths) <= {"request", "http"}:
        ap.error("--paths takes request, http or both")
    base = args.data_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    modes = [True] if args.insecure else [False] if args.tls_only else [False, True]
    t0 = time.perf_counter()
    result: dict = {"sizes_MB": args.sizes, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="p2pgrid-bench-", dir=base) as root:
        for insecure in modes:
            result["h2c" if insecure else "tls"] = _run_mode(args, insecure, Path(root))
        if args.sizes and not args.no_raw:
            result["raw"] = {}
            for kind in ("tcp", "tls"):
                _log(f"[raw {kind}]")
                result["raw"][kind] = _raw_run(args, kind, Path(root))
            if "tls" in result:
                result["ratio"] = _ratios(result["tls"], result["raw"]["tls"])
                result["ratio_mean"] = _ratios(result["tls"], result["raw"]["tls"], "_mean")
                _log(f"  p2pgrid TLS / raw TLS: medians {result['ratio']}, "
                     f"means {result['ratio_mean']}")
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
