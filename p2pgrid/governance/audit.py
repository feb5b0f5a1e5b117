"""The audit trail: an append-only log whose entries are chained by SHA-256.

Each entry is stored as canonical JSON (sorted keys, no spaces) with the hash
``sha256(prev_hash + "\\n" + text)``; the first entry's ``prev`` is 64 zeros. The
entry itself carries its sequence number, so editing, deleting, inserting or
reordering any entry breaks the chain from that point on, and :func:`verify` says
where. Cutting entries off the end leaves a shorter valid chain, so the peer also
signs *checkpoints* (sequence number and hash of the head) with its Ed25519 key:
a log cut below a checkpoint, or a checkpoint that does not match, fails too.

Functions here run inside the caller's SQLite transaction (see ``store.py``).

>>> import sqlite3
>>> db = sqlite3.connect(":memory:"); _ = db.executescript(SCHEMA)
>>> _ = append(db, [{"action": "get", "caller": "bob"}, {"action": "compute", "caller": "ana"}])
>>> verify(db).ok
True
>>> _ = db.execute("UPDATE audit SET entry = replace(entry, 'bob', 'eve') WHERE seq = 1")
>>> v = verify(db); v.ok, v.problems[0]
(False, 'entry 1: hash does not match its content')
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

GENESIS = "0" * 64

SCHEMA = """
    CREATE TABLE audit (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL, prev TEXT NOT NULL,
        hash TEXT NOT NULL);
    CREATE TABLE audit_checkpoints (seq INTEGER PRIMARY KEY, hash TEXT NOT NULL,
        time REAL NOT NULL, signature BLOB NOT NULL);
"""


def _public(value):
    """JSON for facts only: anything else (a tensor, say) becomes its type name."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _public(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()[:64]
    shape = getattr(value, "shape", None)
    return f"<{type(value).__name__}{list(shape) if shape is not None else ''}>"


def canonical(entry: dict) -> str:
    return json.dumps(_public(entry), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=str)


def link(prev: str, text: str) -> str:
    return hashlib.sha256(f"{prev}\n{text}".encode()).hexdigest()


def head(db) -> tuple[int, str]:
    row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (row[0], row[1]) if row else (0, GENESIS)


_access_log = logging.getLogger("p2pgrid.access")


def access_line(e: dict) -> str | None:
    """One line for the owner's terminal about an access event (a request filed, a
    denial, a release), or None for the rest. Names and ids only, never values."""
    action, who = e.get("action"), e.get("caller") or "?"
    what = e.get("object") or ", ".join(map(str, e.get("objects") or ())) or e.get("message") or "?"
    if action == "request":
        right = f"epsilon {e['epsilon']:g}" if e.get("epsilon") is not None else e.get("right", "get")
        return f"request {e.get('request')} filed by {who} for {right} on {what}"
    if action in ("denied", "release.denied", "smpc.share.refused"):
        why = e.get("why") or e.get("right") or ""
        return f"denied {who} on {what}" + (f": {why}" if why else "")
    if action == "release":
        return f"released to {who} from {what}: epsilon {e.get('epsilon'):g} (DP)"
    if action == "compute" and e.get("fetch") and e.get("release") not in (None, "none"):
        return f"released to {who} from {what}: {e.get('release')}"
    if action == "get":
        return f"released to {who}: {what} (download)"
    if action == "decision":
        return f"request {e.get('request')} {e.get('status', 'decided')} by {who}"
    return None


def append(db, entries: Iterable[dict]) -> tuple[int, str]:
    """Chain `entries` onto the log (inside the caller's write transaction); the new head.
    Access events also go to the ``p2pgrid.access`` logger (the owner's terminal)."""
    seq, prev = head(db)
    rows = []
    for e in entries:
        if _access_log.isEnabledFor(logging.INFO):
            try:
                line = access_line(e)
            except (TypeError, ValueError):  # an odd entry still gets audited
                line = None
            if line:
                _access_log.info("%s", line)
        seq += 1
        e = dict(e)
        e.setdefault("time", time.time())
        e["seq"] = seq
        try:
            text = canonical(e)
        except ValueError:  # NaN or infinity among the fields
            text = canonical({k: (str(v) if isinstance(v, float) else v) for k, v in e.items()})
        h = link(prev, text)
        rows.append((seq, text, prev, h))
        prev = h
    db.executemany("INSERT INTO audit VALUES (?, ?, ?, ?)", rows)
    return seq, prev


def page(db, *, before: int | None = None, after: int | None = None, limit: int = 50,
         action: str | None = None, caller: str | None = None) -> list[dict]:
    """Entries newest first, filtered (see ``GovernanceStore.audit_page``)."""
    where, args = ["1"], []
    if before is not None:
        where.append("seq < ?")
        args.append(int(before))
    if after is not None:
        where.append("seq > ?")
        args.append(int(after))
    if action:
        if action.endswith("."):
            where.append("substr(json_extract(entry, '$.action'), 1, ?) = ?")
            args += [len(action), action]
        else:
            where.append("json_extract(entry, '$.action') = ?")
            args.append(action)
    if caller:
        where.append("json_extract(entry, '$.caller') = ?")
        args.append(caller)
    order = "ASC" if after is not None and before is None else "DESC"
    rows = db.execute(f"SELECT entry, hash FROM audit WHERE {' AND '.join(where)} "
                      f"ORDER BY seq {order} LIMIT ?", (*args, max(0, int(limit)))).fetchall()
    out = []
    for text, h in rows if order == "DESC" else reversed(rows):
        try:
            e = json.loads(text)
        except ValueError:
            e = {"unreadable": True}
        e["hash"] = h
        out.append(e)
    return out


def tail(db, n: int = 20) -> list[dict]:
    """The last `n` entries, newest last."""
    rows = db.execute("SELECT entry, hash FROM audit ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
    out = []
    for text, h in reversed(rows):
        try:
            e = json.loads(text)
        except ValueError:
            e = {"unreadable": True}
        e["hash"] = h
        out.append(e)
    return out


def checkpoint(db, sign: Callable[[bytes], bytes]) -> tuple[int, str] | None:
    """Sign the current head, unless it is signed already; returns it (or None if empty)."""
    seq, h = head(db)
    if seq == 0 or db.execute("SELECT 1 FROM audit_checkpoints WHERE seq = ?", (seq,)).fetchone():
        return None
    db.execute("INSERT INTO audit_checkpoints VALUES (?, ?, ?, ?)",
               (seq, h, time.time(), sign(_checkpoint_bytes(seq, h))))
    return seq, h


def _checkpoint_bytes(seq: int, h: str) -> bytes:
    return f"p2pgrid-audit-v1\n{seq}\n{h}".encode()


@dataclass
class Verdict:
    ok: bool
    entries: int
    head: str
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.ok:
            return (f"audit chain intact: {self.entries} entries, {self.checkpoints} signed "
                    f"checkpoint(s), head {self.head[:16]}")
        return "audit chain BROKEN:\n  " + "\n  ".join(self.problems[:20])


def verify(db, public_key: bytes | None = None, *, start: tuple[int, str] = (0, GENESIS)) -> Verdict:
    """Recompute the chain; check sequence numbers and signed checkpoints. With
    `start` = (seq, hash) of an entry verified before, only what follows it."""
    from ..identity import verify as verify_sig

    problems: list[str] = []
    (expect, prev), hashes = (start[0] + 1, start[1]), {start[0]: start[1]}
    rows = db.execute("SELECT seq, entry, prev, hash FROM audit WHERE seq > ? ORDER BY seq",
                      (start[0],))
    for seq, text, stored_prev, h in rows:
        if seq != expect:
            problems.append(f"entries {expect}..{seq - 1} are missing")
        if stored_prev != prev:
            problems.append(f"entry {seq}: does not follow the entry before it")
        if link(stored_prev, text) != h:
            problems.append(f"entry {seq}: hash does not match its content")
        try:
            inner = json.loads(text).get("seq")
        except (ValueError, AttributeError):
            inner = None
        if inner != seq:
            problems.append(f"entry {seq}: carries sequence number {inner!r}")
        hashes[seq] = h
        prev, expect = h, seq + 1
    n_checks = 0
    for seq, h, _, sig in db.execute("SELECT seq, hash, time, signature FROM audit_checkpoints "
                                     "WHERE seq >= ?", (start[0],)):
        n_checks += 1
        if public_key is not None and not verify_sig(public_key, _checkpoint_bytes(seq, h), sig):
            problems.append(f"checkpoint at entry {seq}: bad signature")
        if seq not in hashes and seq > start[0]:
            problems.append(f"checkpoint at entry {seq}: the log no longer reaches it (cut short)")
        elif seq in hashes and hashes[seq] != h:
            problems.append(f"checkpoint at entry {seq}: head hash differs from the signed one")
    return Verdict(not problems, expect - 1, prev, n_checks, problems)
