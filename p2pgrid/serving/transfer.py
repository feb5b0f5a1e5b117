"""Moving a package between peers in chunks: bounded memory, checked, resumable.

Both directions use the same pieces. The receiver writes each chunk in place into a
sparse ``.part`` file after checking its sha256 against the package's digests, so what
it holds is always a set of verified chunks; after a broken connection (or a restart)
it finds that set again by hashing the chunks of the ``.part`` file, and only the
missing ones travel again. The whole file's sha256 is checked before the model is
built from it, and the model's hash after.

Uploads (owner -> replica host): the host answers an offer with the chunks it has.
Downloads (anyone allowed -> their peer): the client asks a host for the manifest and
then for the chunks it lacks, switching to another host of the model if one fails.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import trio

from ..errors import BadRequest, NotFound, PeerUnavailable
from .messages import Chunk, CommitUpload, GetChunk, HostOffer, Hosted, PutChunk, UploadState
from .package import IO_BLOCK, Digests

log = logging.getLogger("p2pgrid.serving")

PARALLEL = 2        # chunks in flight per transfer
ATTEMPTS = 6        # tries of a transfer before giving up (it stays resumable)
BACKOFF = 0.25      # seconds before the first retry; doubles each time


class PartFile:
    """A package being received: a sparse file of `digests.size` bytes and the set of
    chunks in it that match their digests."""

    def __init__(self, path: Path, digests: Digests):
        self.path, self.digests = path, digests
        self.have: set[int] = set()

    def open(self) -> "PartFile":
        """Create the file, or find which chunks an earlier attempt left in it (blocking)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size == self.digests.size:
            self.have = {i for i in range(self.digests.count) if self._matches(i)}
        else:
            with open(self.path, "wb") as f:
                f.truncate(self.digests.size)
            self.have = set()
        return self

    def _matches(self, index: int) -> bool:
        start, n = self.digests.span(index)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return hashlib.sha256(os.pread(fd, n, start)).digest() == self.digests.chunks[index]
        finally:
            os.close(fd)

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.digests.count) if i not in self.have]

    def write(self, index: int, data: bytes) -> None:
        """Check a chunk against its digest and write it in place (blocking)."""
        if not 0 <= index < self.digests.count:
            raise BadRequest(f"chunk {index} is outside the package's {self.digests.count} chunks")
        start, n = self.digests.span(index)
        if len(data) != n or hashlib.sha256(data).digest() != self.digests.chunks[index]:
            raise BadRequest(f"chunk {index} does not match its sha256", index=index)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, start)
        finally:
            os.close(fd)
        self.have.add(index)

    def complete(self) -> None:
        """All chunks in and the whole file's sha256 right (blocking); then synced to disk."""
        if self.missing:
            raise BadRequest(f"{len(self.missing)} chunks of the package are still missing")
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(IO_BLOCK):
                h.update(block)
            os.fsync(f.fileno())
        if h.digest() != self.digests.sha256:
            self.have.clear()
            raise BadRequest("the package's sha256 does not match its manifest")


async def request(peer, host: str, msg, *, timeout: float | None = None, via: str = "auto"):
    """peer.request to a host by key id or name; a host gone from the directory is
    unavailable (PeerUnavailable), like one that does not answer."""
    try:
        rec = peer.record(host)
    except NotFound:
        raise PeerUnavailable(f"{host} is not in the directory (any more)") from None
    return await peer.request(rec, msg, timeout=timeout, via=via)


def read_chunk(path: Path, digests: Digests, index: int) -> bytes:
    if not 0 <= index < digests.count:
        raise BadRequest(f"chunk {index} is outside the package's {digests.count} chunks")
    start, n = digests.span(index)
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, n, start)
    finally:
        os.close(fd)
    if len(data) != n:
        raise PeerUnavailable("the package file on this peer is truncated")
    return data


async def _notify(on_chunk, index: int) -> None:
    """Tell a progress callback a chunk arrived; it may be async (tests use that to break
    a transfer at a chosen point)."""
    if on_chunk is not None:
        result = on_chunk(index)
        if inspect.isawaitable(result):
            await result


async def in_parallel(items: Iterable, fn: Callable[[object], Awaitable[None]], width: int) -> None:
    """Await fn(item) for every item, at most `width` at once; the first error stops the
    rest and is raised as itself (not wrapped in an exception group)."""
    it = iter(items)
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        async def worker():
            nonlocal error
            for item in it:
                try:
                    await fn(item)
                except Exception as e:
                    if error is None:
                        error = e
                    nursery.cancel_scope.cancel()
                    return
        for _ in range(width):
            nursery.start_soon(worker)
    if error is not None:
        raise error


@dataclass
class TransferReport:
    chunks: int = 0          # chunks in the package
    had: int = 0             # the receiver held these already when we started
    sent: int = 0            # chunks that travelled
    attempts: int = 0
    bytes: int = 0
    chunk_seconds: float = 0.0   # moving the chunks (all attempts)
    seconds: float = 0.0         # the whole call: chunks, checks, building the model
    resumed_with: list[int] = field(default_factory=list)  # chunks the receiver had, per attempt


async def upload(peer, host: str, offer: HostOffer, path: Path, digests: Digests, *,
                 parallel: int = PARALLEL, attempts: int = ATTEMPTS,
                 on_chunk: Callable[[int], object] | None = None) -> tuple[Hosted, TransferReport]:
    """Place a package on `host` (a key id): offer, send the chunks it lacks, commit.

    A broken connection costs a pause and a new offer, whose answer says what the
    host kept; after `attempts` the error is raised and a later upload resumes.
    """
    report = TransferReport(chunks=digests.count)
    t0 = time.perf_counter()
    delay, last = BACKOFF, None
    for attempt in range(attempts):
        report.attempts = attempt + 1
        try:
            state = await request(peer, host, offer)
            if not isinstance(state, UploadState) or state.count != digests.count:
                raise BadRequest(f"{host} answered the offer with something unexpected")
            have = set(state.have)
            report.resumed_with.append(len(have))
            if attempt == 0:
                report.had = len(have)

            async def send(i: int):
                data = await trio.to_thread.run_sync(read_chunk, path, digests, i)
                await request(peer, host, PutChunk(offer.model, offer.hash, i, data))
                report.sent += 1
                report.bytes += len(data)
                await _notify(on_chunk, i)

            await in_parallel([i for i in range(digests.count) if i not in have], send, parallel)
            report.chunk_seconds = time.perf_counter() - t0
            hosted = await request(peer, host, CommitUpload(offer.model, offer.hash), timeout=600)
            report.seconds = time.perf_counter() - t0
            return hosted, report
        except PeerUnavailable as e:
            last = e
            log.info("upload of %s to %s broke (%s); retrying in %.1f s", offer.model, host, e, delay)
            await trio.sleep(delay)
            delay *= 2
    raise PeerUnavailable(f"upload of {offer.model} to {host} failed {attempts} times "
                          f"(resumable): {last}")


async def download(peer, pick_host: Callable[[], str], report_host: Callable[[str, bool], None],
                   owner: str, model: str, hash: str, part: PartFile, *,
                   parallel: int = PARALLEL, attempts: int = ATTEMPTS,
                   on_chunk: Callable[[int], object] | None = None) -> TransferReport:
    """Fill `part` with the package's missing chunks from hosts chosen by `pick_host`
    (the manifest's digests must already be `part.digests`). Blocking work runs in threads."""
    report = TransferReport(chunks=part.digests.count, had=len(part.have))
    t0 = time.perf_counter()
    delay, last = BACKOFF, None
    for attempt in range(attempts):
        report.attempts = attempt + 1
        host = pick_host()
        report.resumed_with.append(len(part.have))

        async def fetch(i: int):
            # a chunk is large: its reply streams best as a request's (no call, no ticket)
            reply = await request(peer, host, GetChunk(owner, model, hash, i), via="http")
            if not isinstance(reply, Chunk) or reply.index != i:
                raise BadRequest(f"{host} answered chunk {i} with something else")
            await trio.to_thread.run_sync(part.write, i, reply.data)
            report.sent += 1
            report.bytes += len(reply.data)
            await _notify(on_chunk, i)

        try:
            await in_parallel(part.missing, fetch, parallel)
            report.chunk_seconds = time.perf_counter() - t0
            report_host(host, True)
            return report
        except PeerUnavailable as e:
            last = e
            report_host(host, False)
            log.info("download of %s from %s broke (%s); retrying in %.1f s", model, host, e, delay)
            await trio.sleep(delay)
            delay *= 2
    raise PeerUnavailable(f"download of {model} failed {attempts} times; {len(part.missing)} of "
                          f"{part.digests.count} chunks missing (call again to resume): {last}")


__all__ = ["PartFile", "read_chunk", "upload", "download", "in_parallel", "TransferReport",
           "request"]
