"""A served model on disk: one file, written and read a tensor at a time.

Layout of a package file::

    b"P2PGPKG1" | u64 little-endian header length | header (canonical CBOR) | pad to 64
    | tensor bytes, each starting at a multiple of 64

The header holds the model spec of :mod:`p2pgrid.modelgraph` without its tensors
(``modules``, ``forward``, ``tied``, ``frozen``), a table of the tensors
(group, name, dtype, shape, offset, nbytes) and the model hash. Writing reads each
tensor of the live model in place; reading builds the model through
:func:`~p2pgrid.modelgraph.import_model` (every layer and op checked against the
whitelist) with placeholder tensors and then reads the bytes straight into the
model's own tensors. Neither side ever holds the serialized model in memory.

:func:`spec_hash` is :func:`p2pgrid.modelgraph.model_hash` computed without building
the canonical CBOR in memory (it hashes the tensors in place), so the hash a
receiver checks is the one anybody can compute with ``model_hash(model)``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import cbor2
import torch
from torch import nn

from .. import wire
from ..errors import BadRequest, ShapeError
from ..modelgraph import export_model, import_model
from .policy import DTYPES

__all__ = ["live_spec", "spec_hash", "write_package", "read_header", "import_package",
           "Digests", "file_digests", "CHUNK_SIZE"]

MAGIC = b"P2PGPKG1"
FORMAT = "p2pgrid.package/1"
ALIGN = 64
CHUNK_SIZE = 4 << 20      # bytes per transfer chunk
IO_BLOCK = 8 << 20        # bytes per read/write/hash call
MAX_HEADER = 64 << 20
_GROUPS = ("state", "constants")


# ------------------------------------------------------------------ the spec, in place

def live_spec(model: nn.Module) -> dict:
    """``export_model(model)`` whose tensors are the model's own (detached), not copies.

    Export clones every tensor; for a 500 MB model that is 500 MB more. So we export a
    twin whose parameters and buffers live on the meta device (a deep copy that maps
    each tensor to a meta one) and put the real tensors into the spec afterwards.
    """
    memo: dict = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(
            t, nn.Parameter) else meta
    try:
        twin = copy.deepcopy(model, memo)
    except Exception:  # not deep-copyable: pay for export's copies instead
        return export_model(model)
    spec = export_model(twin)
    real = dict(model.named_parameters(remove_duplicate=False))
    real.update(model.named_buffers(remove_duplicate=False))
    state = {}
    for name, t in spec["state"].items():
        r = real[name].detach()
        if r.shape != t.shape or r.dtype != t.dtype:  # pragma: no cover - the twin is a copy
            raise ShapeError(f"export of {name!r} does not match the model")
        state[name] = r
    spec["state"] = state
    return spec


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, in place when it is contiguous (as model_hash sees them)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _tensors(spec: dict) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Every tensor of a spec in a fixed order (by group, then name), so a package's
    bytes depend on the model only."""
    for group in _GROUPS:
        for name, t in sorted((spec.get(group) or {}).items()):
            yield group, name, t


def _bytes_header(n: int) -> bytes:
    """CBOR major type 2 (byte string) header for n bytes."""
    if n < 24:
        return bytes([0x40 + n])
    for code, fmt, limit in ((24, ">B", 1 << 8), (25, ">H", 1 << 16), (26, ">I", 1 << 32),
                             (27, ">Q", 1 << 64)):
        if n < limit:
            return bytes([0x40 + code]) + struct.pack(fmt, n)
    raise ValueError("byte string too long for CBOR")


def spec_hash(spec: dict) -> str:
    """Equal to ``modelgraph.model_hash(spec)``, without copying any tensor.

    The canonical CBOR is built with a 16-byte random token standing for each
    tensor's bytes; hashing then streams the encoding, swapping each token (and its
    1-byte length header) for the real byte string.
    """
    tokens: dict[bytes, torch.Tensor] = {}

    def canon(v):
        if isinstance(v, torch.Tensor):
            tok = os.urandom(16)
            tokens[tok] = v
            return ["tensor", str(v.dtype).removeprefix("torch."), list(v.shape), tok]
        if isinstance(v, dict):
            return {str(k): canon(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        return v

    enc = cbor2.dumps(canon(spec), canonical=True)
    places = sorted((enc.index(tok), tok) for tok in tokens)
    h = hashlib.sha256()
    pos = 0
    for at, tok in places:
        if enc[at - 1] != 0x50:  # pragma: no cover - a 16-byte string has this header
            raise ValueError("unexpected CBOR layout around a tensor")
        h.update(enc[pos:at - 1])
        raw = _raw(tokens[tok])
        h.update(_bytes_header(len(raw)))
        for off in range(0, len(raw), IO_BLOCK):
            h.update(raw[off:off + IO_BLOCK])
        pos = at + 16
    h.update(enc[pos:])
    return h.hexdigest()


# ------------------------------------------------------------------ digests of a file

@dataclass(frozen=True)
class Digests:
    """What a receiver checks: the file's size and sha256, and each chunk's sha256."""

    size: int
    sha256: bytes
    chunk_size: int
    chunks: tuple[bytes, ...]

    def to_dict(self) -> dict:
        return {"size": self.size, "sha256": self.sha256, "chunk_size": self.chunk_size,
                "chunks": list(self.chunks)}

    @classmethod
    def from_dict(cls, d: dict) -> "Digests":
        try:
            size, sha, cs, chunks = int(d["size"]), bytes(d["sha256"]), int(d["chunk_size"]), d["chunks"]
        except (KeyError, TypeError, ValueError):
            raise BadRequest("digests: expected size, sha256, chunk_size, chunks") from None
        if not (0 < cs <= 64 << 20 and size >= 0 and len(sha) == 32
                and isinstance(chunks, (list, tuple)) and len(chunks) == -(-size // cs)
                and all(isinstance(c, bytes) and len(c) == 32 for c in chunks)):
            raise BadRequest("digests do not describe a file of that size")
        return cls(size, sha, cs, tuple(chunks))

    @property
    def count(self) -> int:
        return len(self.chunks)

    def span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(self.size, start + self.chunk_size) - start


class _DigestingWriter:
    """Writes sequentially, hashing the whole and every chunk_size-aligned chunk."""

    def __init__(self, f: BinaryIO, chunk_size: int):
        self.f, self.chunk_size = f, chunk_size
        self.whole, self.cur = hashlib.sha256(), hashlib.sha256()
        self.pos, self.chunks = 0, []

    def write(self, data) -> None:
        data = memoryview(data)
        while len(data):
            room = self.chunk_size - self.pos % self.chunk_size
            part, data = data[:room], data[room:]
            self.f.write(part)
            self.whole.update(part)
            self.cur.update(part)
            self.pos += len(part)
            if self.pos % self.chunk_size == 0:
                self.chunks.append(self.cur.digest())
                self.cur = hashlib.sha256()

    def finish(self) -> Digests:
        if self.pos % self.chunk_size:
            self.chunks.append(self.cur.digest())
        return Digests(self.pos, self.whole.digest(), self.chunk_size, tuple(self.chunks))


def file_digests(path: Path, chunk_size: int = CHUNK_SIZE) -> Digests:
    w = _DigestingWriter(_NullFile(), chunk_size)
    with open(path, "rb") as f:
        while block := f.read(IO_BLOCK):
            w.write(block)
    return w.finish()


class _NullFile:
    def write(self, data) -> None:
        pass


def sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(IO_BLOCK):
            h.update(block)
    return h.digest()


# ------------------------------------------------------------------ writing

def _pad(n: int) -> int:
    return -n % ALIGN


def write_package(spec: dict, path: Path, *, model_hash: str,
                  chunk_size: int = CHUNK_SIZE) -> Digests:
    """Write `spec` (tensors read in place) to `path` atomically; return its digests."""
    table, offset = [], 0
    for group, name, t in _tensors(spec):
        n = t.numel() * t.element_size()
        table.append({"group": group, "name": name, "dtype": str(t.dtype).removeprefix("torch."),
                      "shape": list(t.shape), "offset": offset, "nbytes": n})
        offset += n + _pad(n)
    rest = {k: v for k, v in spec.items() if k not in _GROUPS}
    header = cbor2.dumps({"format": FORMAT, "spec": rest, "tensors": table,
                          "model_hash": model_hash}, canonical=True)
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "wb") as f:
        w = _DigestingWriter(f, chunk_size)
        w.write(MAGIC + struct.pack("<Q", len(header)))
        w.write(header)
        w.write(bytes(_pad(len(MAGIC) + 8 + len(header))))
        for _, _, t in _tensors(spec):
            raw = _raw(t)
            for off in range(0, len(raw), IO_BLOCK):
                w.write(raw[off:off + IO_BLOCK])
            w.write(bytes(_pad(len(raw))))
        digests = w.finish()
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return digests


# ------------------------------------------------------------------ reading

def read_header(f: BinaryIO, size: int) -> tuple[dict, int]:
    """The checked header of an open package of `size` bytes, and where its data starts."""
    start = f.read(len(MAGIC) + 8)
    if len(start) != len(MAGIC) + 8 or start[:len(MAGIC)] != MAGIC:
        raise BadRequest("not a p2pgrid model package")
    (n,) = struct.unpack("<Q", start[len(MAGIC):])
    if n > min(MAX_HEADER, size):
        raise BadRequest("model package header is too large")
    header = wire.loads(f.read(n), max_size=MAX_HEADER)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BadRequest(f"model package: expected format {FORMAT!r}")
    base = len(MAGIC) + 8 + n
    base += _pad(base)
    table = header.get("tensors")
    if not isinstance(table, list) or not isinstance(header.get("spec"), dict) \
            or not isinstance(header.get("model_hash"), str):
        raise BadRequest("model package: header needs spec, tensors and model_hash")
    end = 0
    for e in table:
        if not isinstance(e, dict) or e.get("group") not in _GROUPS or not isinstance(e.get("name"), str) \
                or e.get("dtype") not in DTYPES:
            raise BadRequest("model package: bad tensor entry")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > 32 or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape):
            raise BadRequest(f"model package: bad shape for {e['name']!r}")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=DTYPES[e["dtype"]]).element_size()
        if e.get("nbytes") != nbytes or e.get("offset") != end:
            raise BadRequest(f"model package: {e['name']!r} has a wrong size or offset")
        end += nbytes + _pad(nbytes)
    if base + end != size:
        raise BadRequest(f"model package: tensors need {base + end} bytes, the file has {size}")
    return header, base


def import_package(path: Path) -> tuple[nn.Module, dict]:
    """Build the model a package holds, and return it with the package header.

    Peak memory is the model plus one IO block: :func:`import_model` checks the spec
    and allocates the tensors (from zero-stride placeholders), then the file's bytes
    are read into them.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header, base = read_header(f, size)
        spec = dict(header["spec"])
        spec["state"], spec["constants"] = {}, {}
        for e in header["tensors"]:
            spec[e["group"]][e["name"]] = torch.zeros((), dtype=DTYPES[e["dtype"]]).expand(e["shape"])
        model = import_model(spec)
        for e in header["tensors"]:
            target = _target(model, e["group"], e["name"])
            if list(target.shape) != e["shape"] or str(target.dtype).removeprefix("torch.") != e["dtype"]:
                raise ShapeError(f"model package: {e['name']!r} does not fit the imported model")
            if not target.is_contiguous():  # pragma: no cover - import allocates them dense
                raise ShapeError(f"imported tensor {e['name']!r} is not contiguous")
            raw = _raw(target)
            f.seek(base + e["offset"])
            off = 0
            while off < len(raw):
                got = f.readinto(raw[off:off + IO_BLOCK])
                if not got:
                    raise BadRequest("model package is truncated")
                off += got
    model.eval()
    return model, header


def _target(model: nn.Module, group: str, name: str) -> torch.Tensor:
    if group == "constants":
        return model.get_buffer(name)
    try:
        return model.get_parameter(name).data
    except AttributeError:
        return model.get_buffer(name)
