"""Warm buffers for large bodies: memory a finished transfer gives back for the next.

Why: a body of hundreds of megabytes received into fresh memory pays for every page
the first time it is written (the kernel finds, zeroes and maps it; on this project's
VMs 0.1 to 5 ms per MB, the upper end when huge pages must be compacted first). That,
not TLS, made large transfers swing between full speed and a third of it. A raw socket
that receives into the same buffer each time never pays it. So bodies of
:data:`MIN_SIZE` bytes or more (a request's body on the server and a reply on the caller,
over a bulk connection, :mod:`p2pgrid.bulk`, or HTTP/2; an encoded request) are received
or written into memory taken from a :class:`Pool`, which gets it back when the last array, tensor or memoryview made from it
is gone, and keeps it for the next body.

Other blocks come from the C allocator, whose defaults hand megabyte-sized blocks back
to the kernel as soon as they are freed (glibc: a block above the mmap threshold, 128 KiB
at first, is unmapped; a heap top over the trim threshold is trimmed), so the next
transfer faults their pages in again: about 950 page faults per 1 MB reply on the
caller, 1-1.5 ms of CPU. :func:`tune_allocator` keeps them in the heap instead.

What it costs: idle memory, at most :attr:`Pool.keep` bytes per process (default
:data:`KEEP`), each idle buffer freed after :data:`IDLE_S` seconds unused
(:meth:`Pool.trim`, called by the peer's housekeeping). The pool is per process, not per
peer, as an allocator is: memory freed by one peer's transfer is as warm for the next
peer's in the same process, and a test process with many peers keeps one pool's worth,
not one each. A buffer reused for another caller holds that caller's old bytes only
past the end of what was received, which nothing reads: a body's array covers exactly
the bytes asked for, all of them written before use.

Example::

    >>> pool = Pool(keep=64 << 20)
    >>> a = pool.take(8 << 20)
    >>> a.nbytes, pool.idle_bytes
    (8388608, 0)
    >>> address = a.ctypes.data
    >>> del a                         # the last user gone: the memory is idle, warm
    >>> pool.idle_bytes
    8388608
    >>> pool.take(8 << 20).ctypes.data == address
    True
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import threading
import time
import weakref

import numpy as np

__all__ = ["Pool", "take", "POOL", "MIN_SIZE", "KEEP", "IDLE_S", "tune_allocator", "MMAP_FROM",
           "HEAP_KEPT"]

MIN_SIZE = 4 << 20       # smaller bodies come from the allocator (its own caches suffice)
KEEP = 576 << 20         # idle bytes a process keeps: two 256 MB tensors' bodies and slack
IDLE_S = 60.0            # an idle buffer unused this long is freed
_ROUND = 1 << 20         # capacities are whole megabytes, so near sizes share buffers
MMAP_FROM = 32 << 20     # blocks from this size are mapped, smaller ones come from the heap
HEAP_KEPT = 64 << 20     # free memory glibc keeps at a heap's top instead of trimming it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)


class Pool:
    """Buffers of :data:`MIN_SIZE` bytes or more, reused once their users are gone."""

    def __init__(self, keep: int = KEEP, idle_s: float = IDLE_S) -> None:
        self.keep, self.idle_s = keep, idle_s
        self._idle: list[tuple[float, np.ndarray]] = []   # (when given back, memory)
        self._lock = threading.Lock()   # buffers come back on whichever thread drops them
        self._leases: dict[int, type] = {}

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(m.nbytes for _, m in self._idle)

    def take(self, n: int) -> np.ndarray:
        """A writable uint8 array of `n` bytes (contents undefined). Its memory goes back
        to the pool when it and everything made from it are gone."""
        if n < MIN_SIZE:
            return np.empty(n, dtype=np.uint8)
        memory = self._reuse(n)
        if memory is None:
            memory = _fresh(-(-n // _ROUND) * _ROUND)
        # The array's buffer is exported by a lease object of its own, which every array,
        # tensor or memoryview made from it keeps alive (numpy does not collapse a view's
        # base past an object that is not an array); when the lease dies, nothing can
        # reach the memory any more and it may be handed out again.
        lease = self._lease_type(memory.nbytes).from_buffer(memory)
        weakref.finalize(lease, self._give_back, memory).atexit = False
        return np.frombuffer(lease, dtype=np.uint8, count=n)

    def trim(self, now: float | None = None) -> None:
        """Free idle buffers unused for :attr:`idle_s` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._idle = [(t, m) for t, m in self._idle if now - t < self.idle_s]

    def _lease_type(self, size: int) -> type:
        with self._lock:
            kind = self._leases.get(size)
            if kind is None:
                kind = self._leases[size] = type("Lease", (ctypes.c_ubyte * size,), {})
            return kind

    def _reuse(self, n: int) -> np.ndarray | None:
        with self._lock:
            # the smallest idle buffer that fits, and not more than twice as large
            fits = [(m.nbytes, i) for i, (_, m) in enumerate(self._idle) if n <= m.nbytes <= 2 * n]
            if not fits:
                return None
            return self._idle.pop(min(fits)[1])[1]

    def _give_back(self, memory: np.ndarray) -> None:
        now = time.monotonic()
        with self._lock:
            self._idle.append((now, memory))
            # over the limit: the oldest go first
            total = sum(m.nbytes for _, m in self._idle)
            while total > self.keep and self._idle:
                total -= self._idle.pop(0)[1].nbytes


def _fresh(size: int) -> np.ndarray:
    """New memory in small pages, faulted in as it is first written.

    numpy advises huge pages for an array this large, and where the kernel's memory is
    fragmented it then compacts memory inside the first write to each 2 MiB: 0.1 to 5 ms
    per MB on this project's VMs (1.5 s for a first 256 MB body), against a steady 0.8-1
    for small pages. A pooled buffer is written once per transfer, where huge pages'
    fewer TLB misses buy little. Nothing is committed before it is written, so a caller
    that declares a large body and sends little makes the peer hold little."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):   # not POSIX: what numpy does
        return np.empty(size, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                         dtype=np.uint8)


POOL = Pool()


def take(n: int) -> np.ndarray:
    """:meth:`Pool.take` from the process's pool."""
    return POOL.take(n)


_tuned = False


def tune_allocator() -> bool:
    """Have glibc's malloc keep freed blocks under :data:`MMAP_FROM` in its heap (up to
    :data:`HEAP_KEPT` free at a heap's top) rather than return them to the kernel, so that
    the next transfer's buffers are warm. Once per process; False where the C library is
    not glibc (nothing changed).

    These are the values glibc's own dynamic thresholds reach once a 32 MiB block has been
    freed (its largest mmap threshold, and twice that for trimming); set from the start,
    they also stop a smaller freed block from lowering the trim threshold to twice its
    size, which is what made every megabyte-sized transfer fault its pages in again.

    Global by necessity: the C allocator is the process's, and the buffers in question
    are allocated inside httpcore, h2, hypercorn, the ssl module, numpy and torch, not by
    us. What it costs is bounded: at most HEAP_KEPT bytes stay free per heap, as glibc
    would keep after one 32 MiB block anyway.
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_FROM) and mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT))
    return _tuned
