"""Strangers cannot fill a peer's disk.

Once, any fresh key's PutObject filled the disk, and every write after that answered
500. Now storing is for registered users unless the owner lets anyone
(``p2pgrid users storage anyone``); what others store is held to a quota per caller
and in all; a full disk answers 507 with a clear message; the store stays whole.
"""

import shutil
import subprocess
import sys

import pytest
import torch

from p2pgrid.errors import InsufficientStorage, P2PError, PermissionDenied
from p2pgrid.messages import GetObject, PutObject

import _victim as V

MB = 1 << 20
DISK = 12  # MiB of tmpfs under the victim's store


def _small_disk(store) -> list[str]:
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare -m) for a small disk")
    return ["unshare", "-m", "sh", "-c",
            f'mkdir -p "$0" && mount -t tmpfs -o size={DISK}m tmpfs "$0" && exec "$@"', str(store)]


async def _put(caller, n_bytes=MB):
    return await caller.request(PutObject(torch.ones(n_bytes, dtype=torch.uint8), ["junk"]))


async def test_strangers_cannot_fill_the_disk(tmp_path):
    data = tmp_path / "victim-data"
    v = V.start(tmp_path, wrap=_small_disk(data / "store"),
                peer={"store_quota_bytes": 4 * MB, "store_total_bytes": 64 * MB})
    callers = []
    try:
        mallory = V.Caller(v)
        callers.append(mallory)
        with pytest.raises(PermissionDenied, match="registered"):   # the default
            await _put(mallory)

        # the owner lets anyone store, within quotas
        out = subprocess.run([sys.executable, "-m", "p2pgrid.cli", "users", "storage", "anyone",
                              "--data-dir", str(data)], capture_output=True, text=True,
                             cwd=V.ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        kept = (await _put(mallory)).meta["id"]
        with pytest.raises(InsufficientStorage, match="quota"):
            for _ in range(8):
                await _put(mallory)

        # fresh keys, each within its quota, until the disk itself is full
        full = None
        for _ in range(2 * DISK):
            other = V.Caller(v)
            callers.append(other)
            try:
                for _ in range(3):
                    await _put(other)
            except InsufficientStorage as e:
                if "disk is full" in e.message:
                    full = e
                    break
            except P2PError as e:
                raise AssertionError(f"a full disk must answer 507, not {e.status}: {e}")
        assert full is not None and full.status == 507, "the disk never filled"

        # the peer answers, and what it kept is whole
        assert await V.Caller(v).ping() < 15
        back = await mallory.request(GetObject(kept))
        assert back.value.shape == (MB,) and int(back.value.sum()) == MB
        assert v.alive()
    finally:
        for c in callers:
            await c.aclose()
        v.stop()
