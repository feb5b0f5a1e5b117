"""Running remote programs where they can be stopped: a small pool of worker processes.

A thread cannot be stopped: a program run with ``trio.to_thread`` burns CPU until it
ends, whether or not anyone still waits for it. So :func:`run_program` runs each
program that is not tiny in a worker process of the peer's own, and kills that
process the moment the program's caller goes away (its request cancelled, its
stream cut) or the program passes its wall-clock limit; the next program gets a
fresh one. Before any of that the program is dry-run on ``meta`` tensors and
metered (:mod:`p2pgrid.budget`), so one that would need too much memory or work is
refused with :class:`~p2pgrid.errors.ComputeLimitExceeded` having cost nothing.

The pool is per peer: at most ``program_workers`` processes, started lazily, each
a child of the peer's nursery (so they end with it) and of the peer's process (they
die with it: each watches its parent). Each caller has at most ``programs_running``
programs there at once. Workers run at a lower CPU priority than the peer, so the
peer keeps answering others while they compute, and under an address-space limit a
little above the largest memory budget, in case an estimate falls short.

The worker is this module's :func:`_serve`, in a process of its own. Parent and worker trade length-prefixed
CBOR (:mod:`p2pgrid.wire`): the parent sends the program as it was decoded from the
wire, the worker reads leaf tensors itself from the store's blob files
(:func:`p2pgrid.store.read_blob`), evaluates with :func:`p2pgrid.ops.evaluate`, and
sends back the value and its level, or the typed error. Nothing is pickled.

Programs whose estimate is under ``program_inline_flops`` (a mean over a few
thousand records, say) run in a thread as before: the round trip to a worker would
cost more than the work, and so little work needs no stopping.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import trio

from . import wire
from .budget import Limits, Meter, limits_for
from .errors import (BadRequest, ComputeLimitExceeded, P2PError, RateLimited, ShapeError,
                     error_from_wire)
from .ops import Level, evaluate

log = logging.getLogger("p2pgrid.worker")

__all__ = ["run_program", "Programs", "Cost"]

_LEN = struct.Struct(">Q")
READY = b"p2pgrid-worker-ready"
START_TIMEOUT = 120.0   # seconds a worker may take to import torch on a busy machine
MAX_REPLY = 1 << 34     # bytes: a result is bounded by the memory budget well before this
# The worker imports only the modules it runs (not the package's __init__, which
# pulls in the whole peer): it starts sooner and holds less.
_BOOT = ("import sys, types; pkg = types.ModuleType('p2pgrid'); pkg.__path__ = [sys.argv[1]]; "
         "sys.modules['p2pgrid'] = pkg; from p2pgrid.worker import _serve; "
         "_serve(int(sys.argv[2]), int(sys.argv[3]))")


DRY_RUNS = 256              # passed dry runs remembered per peer (see Programs.dry_run)
DRY_RUN_KEY_MAX = 1 << 20   # bytes: a larger program is dry-run every time, not remembered


def _dry_run_key(program, leaves: dict, min_rows: int, limits: Limits) -> bytes | None:
    """Everything a dry run's outcome depends on, hashed; None for a program too large
    to be worth remembering (or one the wire cannot encode: its dry run says why)."""
    try:
        body = wire.dumps(program)
    except Exception:  # noqa: BLE001 - evaluate reports a malformed program properly
        return None
    if len(body) > DRY_RUN_KEY_MAX:
        return None
    h = hashlib.blake2b(body, digest_size=32)
    shapes = sorted((oid, tuple(m.shape), m.dtype, repr(level)) for oid, (m, level)
                    in leaves.items())
    h.update(repr((shapes, min_rows, limits)).encode())
    return h.digest()


@dataclass(frozen=True)
class Cost:
    """What a program's dry run found: the caller's limits, the metered cost, and the
    result's ``meta`` tensor and level."""
    limits: Limits
    meter: Meter
    probe: object
    level: Level


@dataclass
class _Worker:
    process: trio.Process


class Programs:
    """One peer's programs: its worker pool and what each caller has running."""

    def __init__(self, peer):
        self.peer = peer
        cfg = peer.config
        self.size = max(1, int(cfg.program_workers))
        self._slots = trio.Semaphore(self.size)
        self._idle: list[_Worker] = []
        self._count = 0                      # workers started and not killed
        self._running: dict[str, int] = {}   # caller key id -> programs in workers
        # the address-space cap of every worker: the largest budget any caller has
        names = [*(getattr(cfg, "program_limits", None) or {}), ""]
        self.memory = max(limits_for(cfg, name).memory for name in names)
        self.threads = max(1, (os.cpu_count() or 2) // self.size)
        self._dry_runs: collections.OrderedDict[bytes, Cost] = collections.OrderedDict()

    @staticmethod
    def of(peer) -> Programs:
        """The peer's Programs, created on first use."""
        programs = peer.extensions.get("p2pgrid.programs")
        if programs is None:
            programs = peer.extensions["p2pgrid.programs"] = Programs(peer)
        return programs

    # ------------------------------------------------------------ one program
    def dry_run(self, caller, program: dict, leaves: dict, *, min_rows: int) -> Cost:
        """Run `program` on ``meta`` tensors against `caller`'s limits: its Cost (the
        result's meta tensor included); ComputeLimitExceeded, or the program's own error,
        before any real work.

        `leaves`: object id -> (ObjectMeta, Level) for every leaf it names.

        The dry run depends on nothing but the program, its leaves' shapes, dtypes and
        levels, `min_rows` and the limits, so a passed one is remembered under all of
        them together: the same program asked again (a client polling, say) is not
        re-evaluated, while another object under the same id, a changed level or
        ``min_rows``, or a change to the caller's limits misses and is checked anew."""
        limits = limits_for(self.peer.config, caller.name)
        key = _dry_run_key(program, leaves, min_rows, limits)
        if key is not None:
            cost = self._dry_runs.get(key)
            if cost is not None:
                self._dry_runs.move_to_end(key)
                return cost
        meter = Meter(limits)

        def meta_leaf(oid):
            m, level = leaves[oid]
            return torch.empty(m.shape, dtype=getattr(torch, m.dtype), device="meta"), level
        probe, level = evaluate(program, meta_leaf, min_rows=min_rows, device="meta", meter=meter)
        cost = Cost(limits, meter, probe, level)
        if key is not None:
            self._dry_runs[key] = cost
            while len(self._dry_runs) > DRY_RUNS:
                self._dry_runs.popitem(last=False)
        return cost

    async def run(self, caller, program: dict, leaves: dict, *, min_rows: int):
        """Dry-run `program` (see :meth:`dry_run`), then run it; (value, Level)."""
        cost = self.dry_run(caller, program, leaves, min_rows=min_rows)
        return await self.execute(caller, program, leaves, cost, min_rows=min_rows)

    async def execute(self, caller, program: dict, leaves: dict, cost: Cost, *, min_rows: int):
        """Run `program`, whose :meth:`dry_run` gave `cost`, for real: in a thread if it
        is tiny, else in a worker, within `caller`'s limits; (value, Level)."""
        limits = cost.limits
        if cost.meter.flops <= self.peer.config.program_inline_flops:
            return await trio.to_thread.run_sync(self._inline, program, leaves, min_rows)
        kid = caller.key_id
        if self._running.get(kid, 0) >= limits.running:
            raise RateLimited(f"{caller.name} has {limits.running} programs running here already; "
                              f"this peer allows {limits.running} at once (programs_running)",
                              limit="programs_running", allowed=limits.running)
        self._running[kid] = self._running.get(kid, 0) + 1
        try:
            job = {"program": program, "min_rows": min_rows,
                   "leaves": {oid: {"meta": m.to_dict(), "path": str(self.peer.store.blob_path(oid)),
                                    "level": [lv.kind, lv.row_dim, lv.rows]}
                              for oid, (m, lv) in leaves.items()}}
            reply = await self._in_worker(wire.dumps(job), limits)
        finally:
            left = self._running.get(kid, 1) - 1
            if left:
                self._running[kid] = left
            else:
                self._running.pop(kid, None)
        if "error" in reply:
            raise error_from_wire(reply["error"])
        kind, row_dim, rows = reply["level"]
        return reply["value"], Level(kind, row_dim, rows)

    def _inline(self, program, leaves, min_rows):
        def resolve(oid):
            return self.peer.store.load(oid), leaves[oid][1]
        return evaluate(program, resolve, min_rows=min_rows)

    async def _in_worker(self, job: bytes, limits: Limits) -> dict:
        async with self._slots:
            worker = await self._take()
            ok = False
            try:
                with trio.move_on_after(limits.seconds) as timer:
                    await worker.process.stdin.send_all(_LEN.pack(len(job)) + job)
                    data = await _read_frame(worker.process.stdout)
                    reply = await _loads(data)
                    ok = True
                if timer.cancelled_caught:
                    raise ComputeLimitExceeded(
                        f"the program ran past this peer's limit of {limits.seconds:g} s "
                        f"(program_seconds) and was stopped", limit="program_seconds",
                        allowed=limits.seconds)
                return reply
            finally:
                # a worker whose program did not finish (time, cancellation, a crash) is
                # killed, never reused: that is what makes the program stop
                if ok:
                    self._idle.append(worker)
                else:
                    self._lost(worker)

    async def _take(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.process.returncode is None:
                return worker
            self._count -= 1
        return await self._start()

    async def _start(self) -> _Worker:
        nursery = self.peer.nursery
        if nursery is None:
            raise P2PError("this peer is not running")
        cmd = [sys.executable, "-c", _BOOT, str(Path(__file__).resolve().parent),
               str(self.memory), str(self.threads)]
        process = await nursery.start(partial(
            trio.run_process, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False,
            deliver_cancel=_deliver_kill))
        worker = _Worker(process)
        self._count += 1
        try:
            with trio.fail_after(START_TIMEOUT):
                if await _read_frame(process.stdout) != READY:
                    raise P2PError("a program worker answered its start with junk")
        except BaseException:
            self._count -= 1
            _kill(worker)
            raise
        return worker

    def _lost(self, worker: _Worker) -> None:
        """Kill `worker` and start its successor in the background, so that the next
        program does not wait for torch to load."""
        _kill(worker)
        self._count -= 1
        if self.peer.nursery is not None and self._count < self.size:
            self.peer.nursery.start_soon(self._replenish)

    async def _replenish(self) -> None:
        if self._count >= self.size:
            return
        try:
            worker = await self._start()
        except (P2PError, trio.TooSlowError, OSError) as e:
            log.warning("could not start a program worker: %s", e)
            return
        self._idle.append(worker)


async def run_program(peer, caller, program: dict, leaves: dict, *, min_rows: int):
    """Run `program` for `caller` within the peer's limits: see :class:`Programs`."""
    return await Programs.of(peer).run(caller, program, leaves, min_rows=min_rows)


def _kill(worker: _Worker) -> None:
    try:
        worker.process.kill()
    except ProcessLookupError:
        pass


async def _deliver_kill(process) -> None:
    process.kill()


async def _read_frame(stream) -> bytes:
    head = await _read_exactly(stream, _LEN.size)
    (n,) = _LEN.unpack(head)
    if n > MAX_REPLY:
        raise P2PError("a program worker sent a frame larger than any result")
    return await _read_exactly(stream, n)


async def _read_exactly(stream, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        chunk = await stream.receive_some(min(n - got, 1 << 20))
        if not chunk:
            raise ComputeLimitExceeded("the worker running the program died (out of memory or "
                                       "killed)", limit="program_memory")
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    return bytes(buf) if n < (1 << 20) else buf


async def _loads(data) -> dict:
    if len(data) >= (1 << 20):
        return await trio.to_thread.run_sync(lambda: wire.loads(data, max_size=MAX_REPLY,
                                                                adopt=True))
    return wire.loads(data, max_size=MAX_REPLY)


# ---------------------------------------------------------------- the worker itself

def _serve(memory: int, threads: int) -> None:
    from .store import ObjectMeta, read_blob

    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)   # a stray print must not corrupt the frames
    inp = os.fdopen(0, "rb", buffering=0)
    _die_with_parent()
    os.nice(10)   # the peer's own loop comes first: it keeps answering others
    torch.set_num_threads(threads)
    torch.ones(64, 64) @ torch.ones(64, 64)   # start torch's threads before the limit
    _limit_address_space(memory)

    def send(obj) -> None:
        data = obj if isinstance(obj, bytes) else wire.dumps(obj)
        out.write(_LEN.pack(len(data)))
        out.write(data)

    send(READY)
    while True:
        head = _read(inp, _LEN.size)
        if head is None:
            return   # the peer closed our pipe: it is gone or done with us
        data = _read(inp, _LEN.unpack(head)[0])
        if data is None:
            return
        try:
            job = wire.loads(data, max_size=len(data))
            leaves = {oid: (ObjectMeta.from_dict(d["meta"]), d["path"], Level(*d["level"]))
                      for oid, d in job["leaves"].items()}

            def resolve(oid):
                meta, path, level = leaves[oid]
                try:
                    with open(path, "rb") as f:
                        return read_blob(f, meta), level
                except FileNotFoundError:
                    raise BadRequest(f"object {oid} was deleted while the program ran") from None
            value, level = evaluate(job["program"], resolve, min_rows=job["min_rows"])
            reply = {"value": value, "level": [level.kind, level.row_dim, level.rows]}
        except P2PError as e:
            reply = {"error": e.to_wire()}
        except MemoryError:
            reply = {"error": ComputeLimitExceeded("the program ran out of memory",
                                                   limit="program_memory").to_wire()}
        except Exception as e:  # noqa: BLE001 - the program's fault, answered as such
            reply = {"error": ShapeError(f"the program failed: {type(e).__name__}").to_wire()}
        del data
        send(reply)


def _read(f, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _die_with_parent() -> None:
    """Exit as soon as the peer that started us is gone, even mid-program. (Not
    ``PR_SET_PDEATHSIG``: trio starts processes from a worker thread, and that
    signal comes when the *thread* ends, which trio's thread cache does when idle.)"""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="p2pgrid-worker-watchdog").start()


def _limit_address_space(memory: int) -> None:
    """Cap this process's address space at what it maps now plus twice the memory budget
    (copies, allocator slack) plus 1 GiB: a last line should an estimate fall short."""
    try:
        import resource
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        cap = vm + 2 * memory + (1 << 30)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or cap < soft:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError, StopIteration, ImportError):
        pass

