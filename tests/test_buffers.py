"""Warm buffers (p2pgrid.buffers): memory comes back only when nothing can reach it.

A buffer handed out again while an array, tensor or memoryview made from it lives would
let one transfer's bytes overwrite another's value, so these tests hold each kind of
derivative, drop the original, and check that the memory is neither idle nor reused;
then that large transfers between real peers keep their values apart while the pool
recycles.
"""

import gc
import platform
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import trio

from p2pgrid import buffers
from p2pgrid.messages import GetObject, PutObject
from p2pgrid.testing import open_network

MB = 1 << 20


def test_small_sizes_are_not_pooled():
    pool = buffers.Pool()
    a = pool.take(buffers.MIN_SIZE - 1)
    assert a.nbytes == buffers.MIN_SIZE - 1
    del a
    assert pool.idle_bytes == 0


def test_memory_comes_back_only_when_every_derivative_is_gone():
    pool = buffers.Pool()
    makers = {
        "slice": lambda a: a[10:20],
        "view as float": lambda a: a[:8 * MB].view(np.float64),
        "tensor": lambda a: torch.from_numpy(a),
        "tensor slice": lambda a: torch.from_numpy(a)[5:].view(torch.int8),
        "memoryview slice": lambda a: memoryview(a)[100:200],
        "frombuffer": lambda a: torch.frombuffer(memoryview(a), dtype=torch.uint8),
    }
    for name, make in makers.items():
        a = pool.take(9 * MB)
        address = a.ctypes.data
        kept = make(a)
        del a
        gc.collect()
        assert pool.idle_bytes == 0, f"given back while a {name} lives"
        b = pool.take(9 * MB)
        assert b.ctypes.data != address, f"reused while a {name} lives"
        del kept
        assert pool.idle_bytes == 9 * MB, name
        c = pool.take(9 * MB)
        assert c.ctypes.data == address, name     # warm memory is reused
        del b, c
        pool.trim(now=float("inf"))


def test_sizes_share_buffers_within_a_factor_of_two():
    pool = buffers.Pool()
    a = pool.take(16 * MB)
    address = a.ctypes.data
    del a
    assert pool.take(5 * MB).ctypes.data != address    # over twice the size: not wasted on it
    b = pool.take(12 * MB)
    assert b.ctypes.data == address and b.nbytes == 12 * MB


def test_idle_memory_is_bounded_and_trimmed():
    pool = buffers.Pool(keep=20 * MB, idle_s=60.0)
    held = [pool.take(8 * MB) for _ in range(3)]
    first = held[0].ctypes.data
    while held:
        held.pop(0)                                    # given back oldest first
    assert pool.idle_bytes == 16 * MB                  # the oldest of three went past keep
    again = [pool.take(8 * MB) for _ in range(2)]
    assert first not in {x.ctypes.data for x in again}   # the oldest was freed
    del again
    pool.trim()
    assert pool.idle_bytes > 0                         # recently used: kept
    pool.trim(now=float("inf"))
    assert pool.idle_bytes == 0


def test_memory_dropped_on_another_thread_comes_back():
    pool = buffers.Pool()
    box = [pool.take(6 * MB)]
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert pool.idle_bytes == 6 * MB


async def test_transfers_between_peers_keep_their_values_while_buffers_recycle(tmp_path):
    """Values held by the caller stay intact while later transfers reuse the pool."""
    buffers.POOL.trim(now=float("inf"))
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        n = buffers.MIN_SIZE + 4321
        sent, kept = [], []
        for i in range(4):
            x = torch.randint(0, 256, (n,), dtype=torch.uint8)
            info = await a.request("b", PutObject(x))
            reply = await a.request("b", GetObject(info.meta["id"]))
            sent.append(x)
            if i % 2 == 0:
                kept.append((x, reply.value))    # held while the next transfers run
            del reply
        # the last references may sit a moment longer in a worker thread's frame
        with trio.move_on_after(5):
            while not buffers.POOL.idle_bytes:
                await trio.sleep(0.02)
        assert buffers.POOL.idle_bytes > 0, "no transfer gave its memory back"
        for x, value in kept:
            assert torch.equal(value, x)


_CHURN = """
import resource, sys
from p2pgrid import buffers
if sys.argv[1] == "tuned":
    assert buffers.tune_allocator()
blocks = []
def churn():
    # what a transfer does: megabyte blocks made and freed, a few alive at once
    for size in (1 << 20, (1 << 20) + 9, 3 << 20, 2 << 20):
        blocks.append(bytearray(size))
    blocks.clear()
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_tuned_allocator_keeps_megabyte_blocks_warm():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent.parent)
        return int(out.stdout)
    stock, tuned = faults("stock"), faults("tuned")
    assert stock > 50 * 256, f"glibc's defaults were expected to fault these pages in ({stock})"
    assert tuned < 100, f"{tuned} page faults for blocks that were freed and made again"
