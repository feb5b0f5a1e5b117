"""The peer's object store: tensors with metadata, in SQLite plus one blob file each.

A tensor lives in a file under ``root/blobs/`` as raw little-endian bytes (bool as
uint8, bfloat16 as its int16 bits), never pickled, so loading a blob cannot run
code. Its dtype, shape, tags and access rules live in ``root/objects.db``.

Crash safety rests on one ordering: a blob is written to a temp file, fsynced,
renamed into place and its directory fsynced *before* its row is committed, and a
row is deleted *before* its blob is unlinked. A crash (even ``kill -9``) can thus
leave a temp file or a blob without a row, never a row without its whole blob;
opening the store sweeps such leftovers away.

>>> import tempfile, pathlib, torch
>>> store = Store(pathlib.Path(tempfile.mkdtemp()))
>>> meta = store.put(torch.arange(6.).reshape(2, 3),
...                  ObjectMeta(owner="alice", tags=("#Heart", "ECG"),
...                             rules=Rules(get=("bob",), aggregate=("*",))))
>>> meta.shape, meta.dtype, meta.tags, [m.id for m in store.search(["heart"])] == [meta.id]
((2, 3), 'float32', ('ecg', 'heart'), True)
>>> store.load(meta.id).sum().item(), meta.rules.allows("aggregate", "carol")
(15.0, True)
>>> store.close()
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BadRequest, Conflict, InsufficientStorage, NotFound, P2PError, PayloadTooLarge

__all__ = ["Rules", "ObjectMeta", "Quota", "Store", "normalise_tags", "DTYPES", "LEVELS", "RIGHTS",
           "SCHEMA_VERSION"]

# dtype name -> (torch dtype, numpy dtype of the blob's bytes). Byte order is fixed
# ("<") so a store copied between hosts still reads right. numpy has no bfloat16,
# so it keeps its int16 bits; bool is one 0/1 byte, as on the wire.
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    name: (getattr(torch, name), np.dtype(np_name)) for name, np_name in [
        ("float16", "<f2"), ("float32", "<f4"), ("float64", "<f8"), ("bfloat16", "<i2"),
        ("int8", "i1"), ("int16", "<i2"), ("int32", "<i4"), ("int64", "<i8"), ("uint8", "u1"),
        ("bool", "u1"), ("complex64", "<c8")]}
_BITS_AS = {torch.bool: torch.uint8, torch.bfloat16: torch.int16}
DTYPES = tuple(_DTYPES)
LEVELS = ("public", "aggregate", "row")  # the kinds of p2pgrid.ops.Level
RIGHTS = ("compute", "get", "aggregate")
_TAG_LEAD = re.compile(r"^[\s#]+")
_TMP, _BLOB = ".tmp-", ".blob"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BadRequest(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_time(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_blob(f, meta: ObjectMeta, *, mapped: bool = False) -> torch.Tensor:
    """A fresh tensor with the values in open blob file `f` of the object `meta` describes.

    `mapped`: over a private (copy-on-write) mapping of the file instead of a copy in
    memory, for a value that is only sent (a download): reading 256 MB into fresh memory
    costs 0.5-1 ms per MB before the first byte can leave, the mapping next to nothing
    (its pages are the file's, already cached). Writes to such a tensor never reach the
    file, but it keeps the file's blocks in use until it is freed, even once the object
    is deleted; so it is for values that live as long as a reply."""
    tdtype, npdtype = _DTYPES[meta.dtype]
    # read into memory by default: a mapping pins the file's blocks (see above)
    size = os.fstat(f.fileno()).st_size
    if size != meta.nbytes:
        raise P2PError(f"blob of object {meta.id} is {size} bytes, expected {meta.nbytes}")
    if mapped and size:
        arr = np.frombuffer(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY),
                            dtype=npdtype, count=math.prod(meta.shape))
    else:
        arr = np.fromfile(f, dtype=npdtype, count=math.prod(meta.shape))
    # torch takes native byte order only; this is a no-op on little-endian hosts.
    t = torch.from_numpy(arr.astype(npdtype.newbyteorder("="), copy=False).reshape(meta.shape))
    # Any byte but 0 and 1 in a bool tensor is undefined behaviour in torch.
    if tdtype is torch.bool and t.numel() and int(t.max()) > 1:
        raise P2PError(f"blob of bool object {meta.id} holds values other than 0 and 1")
    return t.view(tdtype)


def normalise_tags(tags: Iterable[str] | str) -> tuple[str, ...]:
    """Tags as stored and searched: lowercase, no surrounding space or leading '#',
    no empties, no duplicates, sorted (a tag set has no order worth keeping).

    >>> normalise_tags(["#Heart", "heart", " ECG ", "#"])
    ('ecg', 'heart')
    """
    if isinstance(tags, str):
        tags = (tags,)
    _check(isinstance(tags, Iterable), "tags must be a list of strings")
    out = set()
    for tag in tags:
        _check(isinstance(tag, str), f"tags must be strings, got {type(tag).__name__}")
        tag = _TAG_LEAD.sub("", tag).rstrip().lower()
        if tag:
            out.add(tag)
    return tuple(sorted(out))


@dataclass(frozen=True)
class Rules:
    """Who may do what with an object, by user/peer name; "*" means anyone.

    `get` covers row-level results derived from the object too; `aggregate` covers
    reductions over at least `min_rows` rows.

    >>> r = Rules.strictest([Rules(get=("*",), min_rows=5), Rules(get=("bob", "carol"))])
    >>> r.get, r.min_rows, r.allows("get", "bob"), r.allows("compute", "bob")
    (('bob', 'carol'), 10, True, False)
    """

    compute: tuple[str, ...] = ()
    get: tuple[str, ...] = ()
    aggregate: tuple[str, ...] = ()
    min_rows: int = 10

    def __post_init__(self):
        for right in RIGHTS:
            names = getattr(self, right)
            # A bare string would otherwise pass as a tuple of one-letter names.
            ok = isinstance(names, (list, tuple)) and all(isinstance(n, str) and n for n in names)
            _check(ok, f"rules.{right} must be a list of non-empty names")
            object.__setattr__(self, right, tuple(dict.fromkeys(names)))
        _check(_is_int(self.min_rows), "rules.min_rows must be a non-negative integer")

    def allows(self, right: str, who: str) -> bool:
        """Whether `who` holds `right` ("compute", "get" or "aggregate")."""
        _check(isinstance(right, str) and right in RIGHTS, f"unknown right {right!r}")
        names = getattr(self, right)
        return "*" in names or who in names

    @staticmethod
    def strictest(rules: Iterable[Rules]) -> Rules:
        """Rules for something derived from all of `rules`: a name keeps a right only
        if every input grants it ("*" grants all), and the largest min_rows wins.
        No inputs give `Rules()`, which grants nothing: failing closed beats "anyone".
        """
        rules = list(rules)
        if not rules:
            return Rules()

        def meet(right):
            lists = [names for r in rules if "*" not in (names := getattr(r, right))]
            return tuple(n for n in lists[0] if all(n in o for o in lists)) if lists else ("*",)
        return Rules(*map(meet, RIGHTS), min_rows=max(r.min_rows for r in rules))

    def to_dict(self) -> dict:
        return {"compute": list(self.compute), "get": list(self.get),
                "aggregate": list(self.aggregate), "min_rows": self.min_rows}

    @classmethod
    def from_dict(cls, d) -> Rules:
        """Inverse of `to_dict`; missing fields take defaults; junk raises BadRequest."""
        _check(isinstance(d, Mapping), "rules must be a map")
        unknown = set(d) - {*RIGHTS, "min_rows"}
        _check(not unknown, f"rules: unknown fields {sorted(map(str, unknown))}")
        return cls(**d)


@dataclass(frozen=True)
class ObjectMeta:
    """Everything the store knows about an object but its values.

    `put` fills `id` (when empty), `created` (when 0), `shape`, `dtype` and `nbytes`,
    so a caller names only what it decides: ``ObjectMeta(owner="alice", tags=...)``.

    >>> m = ObjectMeta(owner="alice", tags=["#X-Ray"], shape=[3])
    >>> m.tags, m.shape, ObjectMeta.from_dict(m.to_dict()) == m
    (('x-ray',), (3,), True)
    """

    id: str = ""
    owner: str = ""
    shape: tuple[int, ...] = ()
    dtype: str = ""
    tags: tuple[str, ...] = ()
    description: str = ""
    rules: Rules = Rules()
    level: str = "row"
    created: float = 0.0
    expires: float | None = None
    nbytes: int = 0
    # a stored result's derivation (p2pgrid.release.Derivation as JSON), "" otherwise;
    # the owner's peer keeps it to itself (handlers.info leaves it out)
    derivation: str = ""
    # a table's column names, in the order of the tensor's columns (the schema a
    # scientist's rec["name"] resolves against); () for a plain tensor
    columns: tuple[str, ...] = ()

    def __post_init__(self):
        # Ids reach logs and URLs, never paths (blob names are hashes of them).
        _check(isinstance(self.id, str) and len(self.id) <= 256 and self.id.isprintable(),
               "object id must be printable text of at most 256 characters")
        _check(all(isinstance(x, str) for x in (self.owner, self.dtype, self.description)),
               "owner, dtype and description must be strings")
        _check(isinstance(self.shape, (list, tuple)) and all(map(_is_int, self.shape)),
               "shape must be a list of non-negative integers")
        _check(isinstance(self.rules, Rules), "rules must be a Rules")
        _check(isinstance(self.level, str) and self.level in LEVELS, f"level must be in {LEVELS}")
        _check(_is_time(self.created) and (self.expires is None or _is_time(self.expires)),
               "created and expires must be numbers (expires may be null)")
        _check(_is_int(self.nbytes), "nbytes must be a non-negative integer")
        _check(isinstance(self.derivation, str), "derivation must be a string")
        _check(isinstance(self.columns, (list, tuple)) and len(self.columns) <= 100_000
               and all(isinstance(c, str) and 0 < len(c) <= 256 for c in self.columns),
               "columns must be a list of non-empty names")
        _check(len(set(self.columns)) == len(self.columns), "column names must be distinct")
        set_ = object.__setattr__
        set_(self, "shape", tuple(self.shape))
        set_(self, "columns", tuple(self.columns))
        set_(self, "tags", normalise_tags(self.tags))
        set_(self, "created", float(self.created))
        set_(self, "expires", None if self.expires is None else float(self.expires))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(shape=list(self.shape), tags=list(self.tags), rules=self.rules.to_dict(),
                 columns=list(self.columns))
        return d

    @classmethod
    def from_dict(cls, d) -> ObjectMeta:
        """Inverse of `to_dict`; missing fields take defaults; junk raises BadRequest."""
        _check(isinstance(d, Mapping), "object metadata must be a map")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        _check(not unknown, f"object metadata: unknown fields {sorted(map(str, unknown))}")
        return cls(**{**d, **({"rules": Rules.from_dict(d["rules"])} if "rules" in d else {})})


@dataclass(frozen=True)
class Quota:
    """Limits on what callers other than the peer store on it (checked by `Store.put`):
    objects and bytes per owner, and of all owners but `host` together."""

    count: int
    nbytes: int
    total_count: int
    total_nbytes: int
    host: str  # the peer's own objects (results included) count in no quota


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(nbytes: int) -> InsufficientStorage:
    return InsufficientStorage(f"this peer's disk is full: it cannot store {nbytes} more bytes")


# _SCHEMA[v] upgrades a database at user_version v to v + 1; append, never edit.
_SCHEMA = ["""
    CREATE TABLE objects (id TEXT PRIMARY KEY, owner TEXT NOT NULL, shape TEXT NOT NULL,
        dtype TEXT NOT NULL, description TEXT NOT NULL, rules TEXT NOT NULL, level TEXT NOT NULL,
        created REAL NOT NULL, expires REAL, nbytes INTEGER NOT NULL);  -- shape, rules: JSON
    CREATE INDEX objects_owner ON objects (owner, created);
    CREATE INDEX objects_expires ON objects (expires) WHERE expires IS NOT NULL;
    CREATE TABLE tags (object_id TEXT NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
        tag TEXT NOT NULL, PRIMARY KEY (object_id, tag)) WITHOUT ROWID;
    CREATE INDEX tags_tag ON tags (tag, object_id);
""", """
    ALTER TABLE objects ADD COLUMN derivation TEXT NOT NULL DEFAULT '';
""", """
    ALTER TABLE objects ADD COLUMN columns TEXT NOT NULL DEFAULT '[]';  -- JSON list
"""]
SCHEMA_VERSION = len(_SCHEMA)

_COLS = ("id, owner, shape, dtype, description, rules, level, created, expires, nbytes, "
         "derivation, columns, "
         "(SELECT json_group_array(tag) FROM tags WHERE object_id = objects.id)")


def _row_to_meta(row) -> ObjectMeta:
    oid, owner, shape, dtype, desc, rules, level, created, expires, nbytes, deriv, cols, tags = row
    return ObjectMeta(oid, owner, tuple(json.loads(shape)), dtype, json.loads(tags), desc,
                      Rules.from_dict(json.loads(rules)), level, created, expires, nbytes, deriv,
                      tuple(json.loads(cols)))


class Store:
    """Objects under `root`: ``objects.db`` (SQLite, WAL) and ``blobs/``.

    Synchronous and thread-safe: the peer calls it through ``trio.to_thread.run_sync``.
    `max_bytes` caps the sum of blob sizes; a put that would pass it first reclaims
    expired objects, then raises PayloadTooLarge. Opening sweeps crash leftovers;
    a second Store on a root that is already open raises Conflict.
    """

    def __init__(self, root: Path, *, max_bytes: int | None = None,
                 log: logging.Logger | None = None):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.max_bytes = max_bytes
        self._log = log or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # ids whose blob is being written
        self._conn: sqlite3.Connection | None = None
        self.blobs.mkdir(parents=True, exist_ok=True)
        # The sweep deletes blobs that have no row yet, so a second Store on this
        # root would eat the first one's puts in flight. The kernel drops this
        # lock when the process dies, however it dies.
        self._lockfile = open(self.root / "lock", "ab")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise Conflict(f"store {self.root} is already open") from None
        try:
            self._conn = sqlite3.connect(self.root / "objects.db", check_same_thread=False)
            # synchronous FULL: a put that returned survives power loss, not only a crash.
            self._conn.executescript("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; "
                                     "PRAGMA foreign_keys = ON;")
            self._migrate()
            self._sweep()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the database and release the root; idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._lockfile.close()

    # ------------------------------------------------------------ public API

    def put(self, tensor: torch.Tensor, meta: ObjectMeta, quota: Quota | None = None) -> ObjectMeta:
        """Store a copy of `tensor`; return `meta` completed from it (see ObjectMeta).

        Raises BadRequest (dtype outside DTYPES, no owner, not a dense tensor),
        Conflict (id taken), PayloadTooLarge (over max_bytes) or InsufficientStorage
        (over `quota`, or the disk is full: nothing of the put is left behind).
        """
        _check(isinstance(tensor, torch.Tensor) and isinstance(meta, ObjectMeta),
               "put needs a torch.Tensor and an ObjectMeta")
        _check(bool(meta.owner), "an object needs an owner")
        dtype = str(tensor.dtype).removeprefix("torch.")
        _check(dtype in _DTYPES, f"dtype {dtype} cannot be stored; use one of {', '.join(DTYPES)}")
        _check(tensor.layout == torch.strided, "only dense tensors can be stored")
        _check(not meta.columns or (tensor.dim() == 2 and tensor.shape[1] == len(meta.columns)),
               "named columns need a 2-d tensor with one column per name")
        t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        t = t.view(_BITS_AS.get(t.dtype, t.dtype))
        arr = t.numpy().astype(_DTYPES[dtype][1], copy=False)  # copies on big-endian hosts only
        meta = dataclasses.replace(meta, id=meta.id or uuid.uuid4().hex, shape=tuple(t.shape),
                                   dtype=dtype, nbytes=arr.nbytes,
                                   created=meta.created or time.time())
        with self._lock:
            if meta.id in self._pending or self._db().execute(
                    "SELECT 1 FROM objects WHERE id = ?", (meta.id,)).fetchone():
                raise Conflict(f"object {meta.id} already exists")
            self._make_room(meta.nbytes)
            self._within(quota, meta)
            self._pending.add(meta.id)
        try:
            try:
                self._write_blob(meta.id, arr)
            except OSError as e:
                if e.errno in _FULL:
                    raise _disk_full(meta.nbytes) from None
                raise
            with self._lock:
                self._make_room(meta.nbytes)  # again: puts alongside may have used the room
                self._within(quota, meta)
                try:
                    with self._db() as db:  # one transaction: committed, or rolled back on error
                        db.execute("INSERT INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                   (meta.id, meta.owner, json.dumps(meta.shape), meta.dtype,
                                    meta.description, json.dumps(meta.rules.to_dict()),
                                    meta.level, meta.created, meta.expires, meta.nbytes,
                                    meta.derivation, json.dumps(list(meta.columns))))
                        db.executemany("INSERT INTO tags VALUES (?, ?)",
                                       [(meta.id, tag) for tag in meta.tags])
                except sqlite3.OperationalError as e:
                    if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                        raise _disk_full(meta.nbytes) from None
                    raise
        except BaseException:
            # The id is pending and has no row, so a blob by its name can only be ours.
            self._blob(meta.id).unlink(missing_ok=True)
            raise
        finally:
            with self._lock:
                self._pending.discard(meta.id)
        return meta

    def meta(self, id: str) -> ObjectMeta:
        """The metadata of object `id`; NotFound if there is none."""
        with self._lock:
            return self._meta(id)

    def load(self, id: str, *, mapped: bool = False) -> torch.Tensor:
        """A fresh tensor with object `id`'s values; NotFound if there is none. `mapped`:
        over a copy-on-write mapping of its blob, for a value only sent (see read_blob)."""
        with self._lock:
            meta = self._meta(id)
            # Opened under the lock so the file is the one that row describes,
            # even if a delete and a new put of the same id follow at once.
            try:
                f = open(self._blob(id), "rb")
            except FileNotFoundError:
                raise NotFound(f"object {id} has no blob") from None
        with f:
            return read_blob(f, meta, mapped=mapped)

    def blob_path(self, id: str) -> Path:
        """The file holding object `id`'s values (for :func:`read_blob` in another process)."""
        return self._blob(id)

    def set_rules(self, id: str, rules: Rules) -> ObjectMeta:
        """Replace object `id`'s rules (NotFound if there is none); returns its new metadata."""
        _check(isinstance(rules, Rules), "set_rules needs a Rules")
        with self._lock:
            self._meta(id)
            with self._db() as db:
                db.execute("UPDATE objects SET rules = ? WHERE id = ?",
                           (json.dumps(rules.to_dict()), id))
            return self._meta(id)

    def delete(self, id: str) -> bool:
        """Delete object `id`; False if there was none."""
        with self._lock:
            return self._delete(id)

    def list(self, owner: str | None = None) -> list[ObjectMeta]:
        """All objects (of `owner`, if given), oldest first, expired ones included
        until `expire` reclaims them."""
        return self._select("1", []) if owner is None else self._select("owner = ?", [owner])

    def search(self, tags: Iterable[str]) -> list[ObjectMeta]:
        """Unexpired objects having every one of `tags` (normalised), oldest first.
        No tags match every unexpired object."""
        tags = normalise_tags(tags)
        where, args = "(expires IS NULL OR expires > ?)", [time.time()]
        if tags:
            where += (f" AND id IN (SELECT object_id FROM tags WHERE tag IN "
                      f"({', '.join('?' * len(tags))}) GROUP BY object_id HAVING COUNT(*) = ?)")
            args += [*tags, len(tags)]
        return self._select(where, args)

    def expire(self, now: float | None = None) -> list[str]:
        """Delete objects whose `expires` is at or before `now`; return their ids."""
        with self._lock:
            return self._expire(time.time() if now is None else now)

    # ------------------------------------------------------------ internals (lock held)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise P2PError(f"store {self.root} is closed")
        return self._conn

    def _select(self, where: str, args: list) -> list[ObjectMeta]:  # takes the lock itself
        sql = f"SELECT {_COLS} FROM objects WHERE {where} ORDER BY created, id"
        with self._lock:
            rows = self._db().execute(sql, args).fetchall()
        return [_row_to_meta(r) for r in rows]

    def _blob(self, id: str) -> Path:
        # Hashed so that any id is a safe file name and none can reach outside blobs/.
        return self.blobs / (hashlib.sha256(id.encode()).hexdigest()[:32] + _BLOB)

    def _meta(self, id: str) -> ObjectMeta:
        row = self._db().execute(f"SELECT {_COLS} FROM objects WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise NotFound(f"no object {id}")
        return _row_to_meta(row)

    def _delete(self, id: str) -> bool:
        with self._db() as db:  # row first: a crash before the unlink leaves only an orphan
            gone = db.execute("DELETE FROM objects WHERE id = ?", (id,)).rowcount > 0
        if gone:  # without a row, a blob by this name may be a put in flight
            self._blob(id).unlink(missing_ok=True)
        return gone

    def _expire(self, now: float) -> list[str]:
        ids = [r[0] for r in self._db().execute(
            "SELECT id FROM objects WHERE expires IS NOT NULL AND expires <= ?", (now,))]
        return [i for i in ids if self._delete(i)]

    def _fits(self, nbytes: int) -> bool:
        used = self._db().execute("SELECT COALESCE(SUM(nbytes), 0) FROM objects").fetchone()[0]
        return self.max_bytes is None or used + nbytes <= self.max_bytes

    def usage(self, owner: str | None = None) -> tuple[int, int]:
        """(objects, bytes) stored by `owner`, or by everyone."""
        where, args = ("owner = ?", [owner]) if owner is not None else ("1", [])
        with self._lock:
            return tuple(self._db().execute(
                f"SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM objects WHERE {where}", args
            ).fetchone())

    def _within(self, quota: Quota | None, meta: ObjectMeta) -> None:
        if quota is None or meta.owner == quota.host:
            return
        db = self._db()
        n, used = db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM objects "
                             "WHERE owner = ?", (meta.owner,)).fetchone()
        if n + 1 > quota.count or used + meta.nbytes > quota.nbytes:
            raise InsufficientStorage(
                f"{meta.owner}'s storage quota here is full: {n} objects, {used} bytes stored, "
                f"{meta.nbytes} more would pass the limit of {quota.count} objects or "
                f"{quota.nbytes} bytes; delete some first")
        n, used = db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM objects "
                             "WHERE owner != ?", (quota.host,)).fetchone()
        if n + 1 > quota.total_count or used + meta.nbytes > quota.total_nbytes:
            raise InsufficientStorage(
                f"this peer stores all it takes from others ({quota.total_count} objects or "
                f"{quota.total_nbytes} bytes); try later or elsewhere")

    def _make_room(self, nbytes: int) -> None:
        # Expired objects are reclaimed when a put needs their room, not before.
        if self._fits(nbytes) or self._expire(time.time()) and self._fits(nbytes):
            return
        raise PayloadTooLarge(f"storing {nbytes} bytes would pass this store's limit of "
                              f"{self.max_bytes} bytes")

    def _write_blob(self, id: str, arr: np.ndarray) -> None:
        tmp = self.blobs / f"{_TMP}{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as f:
                f.write(arr.reshape(-1).view(np.uint8).data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._blob(id))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(self.blobs, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename is durable only once the directory is
        finally:
            os.close(fd)

    def _migrate(self) -> None:
        db = self._db()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise P2PError(f"store {self.root} has schema v{version}; this p2pgrid reads up "
                           f"to v{SCHEMA_VERSION}")
        for v in range(version, SCHEMA_VERSION):
            # On failure __init__ closes the connection, which rolls this back.
            db.executescript(f"BEGIN; {_SCHEMA[v]}; PRAGMA user_version = {v + 1}; COMMIT;")

    def _sweep(self) -> None:
        """Undo what a crash can leave: temp files, blobs without rows, and (should a
        disk lose data) rows whose blob is missing or the wrong size."""
        rows = dict(self._db().execute("SELECT id, nbytes FROM objects"))
        names = {self._blob(oid).name: oid for oid in rows}
        sizes: dict[str, int] = {}
        for entry in os.scandir(self.blobs):
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.name in names:
                sizes[names[entry.name]] = entry.stat().st_size
            elif entry.name.startswith(_TMP) or entry.name.endswith(_BLOB):
                self._log.info("store %s: removing %s left by a crash", self.root, entry.name)
                os.unlink(entry.path)
        for oid in [oid for oid, n in rows.items() if sizes.get(oid) != n]:
            have = f"{sizes[oid]} bytes" if oid in sizes else "missing"
            self._log.warning("store %s: dropping object %s: its blob is %s, expected %d bytes",
                              self.root, oid, have, rows[oid])
            self._delete(oid)
