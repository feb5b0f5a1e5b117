"""The governance database of one peer: ``DATA_DIR/governance.db`` (SQLite, WAL).

Users and their roles, settings, access requests and the grants they give, the
privacy budgets and their ledger, and the audit chain all live in one database,
so a decision and its audit entry, or a budget charge, its stored release and
its audit entry, commit in one transaction or not at all. Every write takes
SQLite's write lock first (``BEGIN IMMEDIATE``), which serialises writers across
threads *and* processes: the running peer and the owner's ``p2pgrid`` commands
share the file safely, and two charges can never both pass a check that only one
of them fits.

Synchronous and thread-safe: writes go through one connection behind a lock, reads
through another (WAL readers never wait for a writer's fsync), so the peer's event
loop can read roles and grants at once while a worker thread commits a charge.

>>> import tempfile, pathlib
>>> s = GovernanceStore(pathlib.Path(tempfile.mkdtemp()) / "g.db")
>>> s.add_user("bob", "scientist", by="owner").role
'scientist'
>>> s.set_budget("bob", 1.0, by="owner"); s.remaining("bob")["user"]["left"]
1.0
>>> s.close()
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from ..errors import BadRequest, Conflict, NotFound, P2PError, RateLimited
from ..limits import Guest
from . import audit
from .errors import PrivacyBudgetExceeded
from .mechanism import Bounds, check_epsilon
from .roles import check_name, check_role

__all__ = ["GovernanceStore", "User", "STATUSES"]

STATUSES = ("pending", "approved", "denied")
TOTAL = "*"            # budgets.object_id of a user's total across datasets
SLACK = 1e-9           # float rounding allowed when charging the last bit of a budget
# The total epsilon, per peer, of a user with no budget of their own: names that may
# compute but hold no `aggregate` grant get DP releases (never exact aggregates) out of it.
DEFAULT_EPSILON = 1.0
MAX_PENDING = 50       # open requests per user
FRESH = 0.2            # seconds a snapshot of users and settings is trusted without asking SQLite

# _SCHEMA[v] upgrades a database at user_version v to v + 1; append, never edit.
_SCHEMA = [audit.SCHEMA + """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- value: JSON
    CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT NOT NULL, public_key BLOB,
        added REAL NOT NULL);
    CREATE TABLE requests (id TEXT PRIMARY KEY, user TEXT NOT NULL, key_id TEXT NOT NULL,
        object_id TEXT NOT NULL, right TEXT NOT NULL, epsilon REAL, reason TEXT NOT NULL,
        status TEXT NOT NULL, why TEXT NOT NULL, created REAL NOT NULL, decided REAL,
        decided_by TEXT);
    CREATE INDEX requests_status ON requests (status, created);
    CREATE TABLE grants (user TEXT NOT NULL, object_id TEXT NOT NULL, right TEXT NOT NULL,
        request_id TEXT, granted REAL NOT NULL, PRIMARY KEY (user, object_id, right));
    CREATE TABLE datasets (object_id TEXT PRIMARY KEY, bounds TEXT NOT NULL, epsilon REAL);
    CREATE TABLE budgets (user TEXT NOT NULL, object_id TEXT NOT NULL, epsilon REAL NOT NULL,
        PRIMARY KEY (user, object_id));
    CREATE TABLE ledger (release_id TEXT PRIMARY KEY, user TEXT NOT NULL,
        object_id TEXT NOT NULL, epsilon REAL NOT NULL, time REAL NOT NULL,
        query TEXT NOT NULL, value BLOB NOT NULL);
    CREATE INDEX ledger_user ON ledger (user, object_id);
    CREATE INDEX ledger_object ON ledger (object_id);
""", """
    ALTER TABLE ledger ADD COLUMN pooled INTEGER NOT NULL DEFAULT 0;
""", """
    -- a pooled charge's client address (p2pgrid.limits.address_key): one address's share
    ALTER TABLE ledger ADD COLUMN address TEXT NOT NULL DEFAULT '';
    CREATE INDEX ledger_pooled ON ledger (pooled, address);
"""]
SCHEMA_VERSION = len(_SCHEMA)


@dataclass(frozen=True)
class User:
    name: str
    role: str
    public_key: bytes | None  # None: bound to the key it first calls with
    added: float


def _request_dict(row) -> dict:
    keys = ("id", "user", "key_id", "object_id", "right", "epsilon", "reason", "status", "why",
            "created", "decided", "decided_by")
    return dict(zip(keys, row))


class _Snapshot(NamedTuple):
    """What nearly every request asks for, read once per change of the database."""
    version: int                 # SQLite's data_version when read
    users: dict[str, User]
    settings: dict
    budgeted: frozenset[str]     # users the owner gave a total budget (has_own_budget)


class GovernanceStore:
    def __init__(self, path: Path, *, sign: Callable[[bytes], bytes] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sign = sign
        self._lock = threading.RLock()       # the writing connection
        self._rlock = threading.Lock()       # the reading connection
        self._plock = threading.Lock()      # guards _pending only: recording never waits on I/O
        self._pending: list[dict] = []      # audit entries not chained yet (see record)
        self._taken: list[dict] = []        # ... taken by the open transaction
        self._snapshot: _Snapshot | None = None
        self._checked = 0.0                  # when data_version was last read (monotonic)
        self._verified: tuple[int, str] = (0, audit.GENESIS)  # head of the last intact check
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._rconn: sqlite3.Connection | None = None
        try:
            self._conn.execute("PRAGMA busy_timeout = 30000")
            self._conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a charge or decision that returned survives power loss too.
            self._conn.execute("PRAGMA synchronous = FULL")
            self._migrate()
            self._rconn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                          check_same_thread=False)
            self._rconn.execute("PRAGMA busy_timeout = 30000")
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Chain buffered audit entries, sign the head, close; idempotent."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self.flush()
                self.checkpoint()
            except (sqlite3.Error, P2PError):
                pass
            self._conn.close()
            self._conn = None
            with self._rlock:
                if self._rconn is not None:
                    self._rconn.close()
                    self._rconn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise P2PError(f"governance store {self.path} is closed")
        return self._conn

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise P2PError(f"{self.path} has schema v{version}; this p2pgrid reads up to "
                               f"v{SCHEMA_VERSION}")
            for v in range(version, SCHEMA_VERSION):
                for stmt in _SCHEMA[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version = {v + 1}")

    @contextmanager
    def _tx(self):
        """One write transaction, holding SQLite's write lock from its start."""
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            self._taken = []
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                with self._plock:  # entries chained in vain go back in line
                    self._pending[:0] = self._taken
                raise
            else:
                db.execute("COMMIT")
            finally:
                self._taken = []
                self._snapshot = None  # our own writes do not move data_version

    @contextmanager
    def _reader(self):
        with self._rlock:
            if self._rconn is None:
                raise P2PError(f"governance store {self.path} is closed")
            yield self._rconn

    def _read(self, sql: str, args=()) -> list:
        with self._reader() as db:
            return db.execute(sql, args).fetchall()

    # ------------------------------------------------------------ audit

    def record(self, entry: dict) -> None:
        """Queue an audit entry (the ``peer.audit`` sink); chained by the next flush or
        write transaction, in order."""
        if self._conn is not None:
            with self._plock:
                self._pending.append(dict(entry))

    def flush(self) -> int:
        """Chain every queued audit entry; returns how many."""
        if not self._pending:
            return 0
        with self._tx() as db:
            return self._append(db)

    def _append(self, db, *entries: dict) -> int:
        with self._plock:
            taken, self._pending = self._pending, []
        self._taken += taken
        audit.append(db, [*taken, *entries])
        return len(taken) + len(entries)

    def audit_tail(self, n: int = 20) -> list[dict]:
        self.flush()
        with self._reader() as db:
            return audit.tail(db, n)

    def audit_page(self, *, before: int | None = None, after: int | None = None, limit: int = 50,
                   action: str | None = None, caller: str | None = None) -> list[dict]:
        """Up to `limit` entries, newest first: older than seq `before`, or the oldest ones
        newer than `after`; only `action` (a name, or a prefix ending in '.') and
        `caller` if given."""
        self.flush()
        with self._reader() as db:
            return audit.page(db, before=before, after=after, limit=limit, action=action,
                              caller=caller)

    def verify(self, public_key: bytes | None = None, *, incremental: bool = False) -> audit.Verdict:
        """Check the whole chain; `incremental`: only what was added since the last
        intact incremental check (for a page reloaded often; the CLI checks it all)."""
        self.flush()
        start = self._verified if incremental else (0, audit.GENESIS)
        with self._reader() as db:
            db.execute("BEGIN")  # one consistent snapshot
            try:
                verdict = audit.verify(db, public_key, start=start)
            finally:
                db.execute("COMMIT")
        if verdict.ok:
            self._verified = (verdict.entries, verdict.head)
        return verdict

    def checkpoint(self) -> tuple[int, str] | None:
        if self._sign is None:
            return None
        with self._tx() as db:
            self._append(db)
            return audit.checkpoint(db, self._sign)

    def log(self, action: str, caller: str | None, **fields) -> None:
        """Chain one entry now (for actions with no other write, like logins)."""
        with self._tx() as db:
            self._append(db, {"action": action, "caller": caller, **fields})

    # ------------------------------------------------------------ settings and users

    def _fresh(self):
        # Every request asks for roles, some several times; asking SQLite whether
        # another process (the owner's CLI) wrote costs 0.2 ms each, so that is
        # checked at most every FRESH seconds. Our own writes reset the snapshot.
        snap, now = self._snapshot, time.monotonic()
        if snap is not None and now - self._checked < FRESH:
            return snap
        with self._reader() as db:
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if self._snapshot is None or self._snapshot.version != version:
                users = {r[0]: User(r[0], r[1], None if r[2] is None else bytes(r[2]), r[3])
                         for r in db.execute("SELECT name, role, public_key, added FROM users")}
                settings = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM settings")}
                budgeted = frozenset(r[0] for r in db.execute(
                    "SELECT user FROM budgets WHERE object_id = ?", (TOTAL,)))
                self._snapshot = _Snapshot(version, users, settings, budgeted)
            self._checked = now
            return self._snapshot

    def users(self) -> dict[str, User]:
        return dict(self._fresh().users)

    def user(self, name: str) -> User | None:
        return self._fresh().users.get(name)

    def setting(self, key: str, default=None):
        return self._fresh().settings.get(key, default)

    def settings(self) -> dict:
        return dict(self._fresh().settings)

    def set_setting(self, key: str, value, *, by: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, json.dumps(value)))
            self._append(db, {"action": "setting", "caller": by, "key": key, "value": value})

    @property
    def registered_only(self) -> bool:
        return bool(self.setting("registered_only", False))

    @property
    def releases_registered_only(self) -> bool:
        """Whether only registered users may take anything out (downloads, private
        releases, model calls, training); others may still search and compute."""
        return bool(self.setting("releases_registered_only", False))

    def has_own_budget(self, user: str) -> bool:
        """Whether the owner set `user` a total budget of its own."""
        return user in self._fresh().budgeted

    def add_user(self, name: str, role: str, public_key: bytes | None = None, *, by: str) -> User:
        """Register `name` with `role` (again: change its role, and its key if given)."""
        check_name(name)
        check_role(role)
        if public_key is not None and len(public_key) != 32:
            raise BadRequest("a public key is 32 bytes")
        now = time.time()
        with self._tx() as db:
            old = db.execute("SELECT public_key, added FROM users WHERE name = ?", (name,)).fetchone()
            key = public_key if public_key is not None else (old[0] if old else None)
            db.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?)",
                       (name, role, key, old[1] if old else now))
            self._append(db, {"action": "user.add", "caller": by, "user": name, "role": role,
                              "key_pinned": key is not None})
        return User(name, role, None if key is None else bytes(key), old[1] if old else now)

    def remove_user(self, name: str, *, by: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0
            if gone:
                self._append(db, {"action": "user.remove", "caller": by, "user": name})
        return gone

    def pin_key(self, name: str, public_key: bytes) -> None:
        """Bind a user registered without a key to the key it first called with."""
        with self._tx() as db:
            n = db.execute("UPDATE users SET public_key = ? WHERE name = ? AND public_key IS NULL",
                           (bytes(public_key), name)).rowcount
            if n:
                self._append(db, {"action": "user.key", "caller": name, "user": name})

    # ------------------------------------------------------------ requests and grants

    def create_request(self, *, user: str, key_id: str, object_id: str, right: str,
                       epsilon: float | None, reason: str) -> dict:
        if right not in ("get", "budget", "program"):
            raise BadRequest("a request is for 'get', for privacy budget (give epsilon), or for "
                             "the release of a program")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
            raise BadRequest("give a reason of 1 to 2000 characters")
        now = time.time()
        with self._tx() as db:
            open_ = db.execute("SELECT COUNT(*) FROM requests WHERE user = ? AND status = 'pending'",
                               (user,)).fetchone()[0]
            if open_ >= MAX_PENDING:
                raise RateLimited(f"{user} has {open_} pending requests here; wait for decisions")
            rid = secrets.token_hex(6)
            row = (rid, user, key_id, object_id, right, epsilon, reason.strip(), "pending", "", now,
                   None, None)
            db.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            self._append(db, {"action": "request", "caller": user, "request": rid,
                              "object": object_id, "right": right, "epsilon": epsilon})
        return _request_dict(row)

    def request(self, rid: str) -> dict | None:
        rows = self._read("SELECT * FROM requests WHERE id = ?", (rid,))
        return _request_dict(rows[0]) if rows else None

    def requests(self, status: str | None = None, user: str | None = None,
                 limit: int = 200) -> list[dict]:
        where, args = ["1"], []
        if status is not None:
            if status not in STATUSES:
                raise BadRequest(f"status is one of {', '.join(STATUSES)}")
            where.append("status = ?")
            args.append(status)
        if user is not None:
            where.append("user = ?")
            args.append(user)
        order = "created" if status == "pending" else "created DESC"
        rows = self._read(f"SELECT * FROM requests WHERE {' AND '.join(where)} ORDER BY {order} "
                          f"LIMIT ?", (*args, int(limit)))
        return [_request_dict(r) for r in rows]

    def decide(self, rid: str, *, approve: bool, why: str = "", by: str) -> dict:
        """Approve or deny a pending request; approval grants ``get`` on its object, or
        adds its epsilon to the user's total (and to their cap on that dataset, if any)."""
        if not isinstance(why, str) or len(why) > 2000:
            raise BadRequest("why must be text of at most 2000 characters")
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM requests WHERE id = ?", (rid,)).fetchone()
            if row is None:
                raise NotFound(f"no request {rid}")
            req = _request_dict(row)
            if req["status"] != "pending":
                raise Conflict(f"request {rid} was already {req['status']}")
            status = "approved" if approve else "denied"
            db.execute("UPDATE requests SET status = ?, why = ?, decided = ?, decided_by = ? "
                       "WHERE id = ?", (status, why, now, by, rid))
            if approve and req["right"] == "program":
                # object_id names the program (release.approval_id): its result may leave
                db.execute("INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?, ?)",
                           (req["user"], req["object_id"], "release", rid, now))
            elif approve and req["epsilon"] is None:
                db.execute("INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?, ?)",
                           (req["user"], req["object_id"], "get", rid, now))
            elif approve:
                self._grow_budget(db, req["user"], req["object_id"], req["epsilon"])
            self._append(db, {"action": "decision", "caller": by, "request": rid,
                              "user": req["user"], "object": req["object_id"], "status": status,
                              "epsilon": req["epsilon"], "why": why})
        req.update(status=status, why=why, decided=now, decided_by=by)
        return req

    def has_grant(self, user: str, object_id: str, right: str = "get") -> bool:
        return bool(self._read("SELECT 1 FROM grants WHERE user = ? AND object_id = ? AND right = ?",
                               (user, object_id, right)))

    def revoke_grant(self, user: str, object_id: str, right: str = "get", *, by: str) -> bool:
        """Take back what an approved request granted (``get`` on an object, or the
        ``release`` of a program); the next request sees it. False if there was none."""
        with self._tx() as db:
            gone = db.execute("DELETE FROM grants WHERE user = ? AND object_id = ? AND right = ?",
                              (user, object_id, right)).rowcount > 0
            if gone:
                self._append(db, {"action": "grant.revoke", "caller": by, "user": user,
                                  "object": object_id, "right": right})
        return gone

    def grants(self, user: str | None = None) -> list[dict]:
        rows = self._read("SELECT user, object_id, right, request_id, granted FROM grants"
                          + (" WHERE user = ?" if user else "") + " ORDER BY granted",
                          (user,) if user else ())
        return [dict(zip(("user", "object_id", "right", "request_id", "granted"), r)) for r in rows]

    # ------------------------------------------------------------ privacy budgets

    def set_dataset(self, object_id: str, bounds: Bounds, epsilon: float | None = None, *,
                    by: str) -> None:
        """Declare a dataset's column bounds and (optionally) its total epsilon, all users
        together; private queries need the bounds."""
        if epsilon is not None:
            epsilon = _check_limit(epsilon)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?)",
                       (object_id, json.dumps(bounds.to_list()), epsilon))
            self._append(db, {"action": "dataset", "caller": by, "object": object_id,
                              "bounds": bounds.to_list(), "epsilon": epsilon})

    def dataset(self, object_id: str) -> tuple[Bounds, float | None] | None:
        rows = self._read("SELECT bounds, epsilon FROM datasets WHERE object_id = ?", (object_id,))
        return (Bounds.parse(json.loads(rows[0][0])), rows[0][1]) if rows else None

    def datasets(self) -> dict[str, dict]:
        spent = dict(self._read("SELECT object_id, SUM(epsilon) FROM ledger GROUP BY object_id"))
        return {oid: {"bounds": json.loads(b), "epsilon": eps, "spent": spent.get(oid, 0.0)}
                for oid, b, eps in self._read("SELECT object_id, bounds, epsilon FROM datasets")}

    def set_budget(self, user: str, epsilon: float, object_id: str = TOTAL, *, by: str) -> None:
        """A user's total epsilon on this peer, or (with `object_id`) their cap on one dataset."""
        epsilon = _check_limit(epsilon)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO budgets VALUES (?, ?, ?)", (user, object_id, epsilon))
            self._append(db, {"action": "budget", "caller": by, "user": user,
                              "object": None if object_id == TOTAL else object_id,
                              "epsilon": epsilon})

    def set_default_budget(self, epsilon: float, *, by: str) -> None:
        """The total epsilon of registered users with no budget of their own, and the
        total that all unregistered callers share (default DEFAULT_EPSILON)."""
        self.set_setting("default_epsilon", _check_limit(epsilon), by=by)

    def set_guest_budget(self, epsilon: float | None, *, by: str) -> None:
        """The total epsilon all unregistered callers share (None: the default budget)."""
        self.set_setting("guest_epsilon", None if epsilon is None else _check_limit(epsilon),
                         by=by)

    def budgets(self) -> list[dict]:
        return [{"user": u, "object_id": None if o == TOTAL else o, "epsilon": e}
                for u, o, e in self._read("SELECT user, object_id, epsilon FROM budgets "
                                          "ORDER BY user, object_id")]

    def _grow_budget(self, db, user: str, object_id: str, epsilon: float) -> None:
        total = self._user_limit(db, user)
        db.execute("INSERT OR REPLACE INTO budgets VALUES (?, ?, ?)", (user, TOTAL, total + epsilon))
        db.execute("UPDATE budgets SET epsilon = epsilon + ? WHERE user = ? AND object_id = ?",
                   (epsilon, user, object_id))

    def _user_limit(self, db, user: str) -> float:
        row = db.execute("SELECT epsilon FROM budgets WHERE user = ? AND object_id = ?",
                         (user, TOTAL)).fetchone()
        if row:
            return row[0]
        return self._setting_in(db, "default_epsilon", DEFAULT_EPSILON)

    @staticmethod
    def _setting_in(db, key: str, default):
        row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        value = json.loads(row[0]) if row else None
        return default if value is None else value

    def _limits(self, db, user: str, object_id: str | None,
                pooled: bool | Guest | None = False) -> dict[str, dict]:
        """Every limit that applies to `user` on `object_id`: label -> limit, spent, left.
        A pooled user (unregistered: its name vouches for nothing) spends from the one
        total all such users share, not from a total of its own; one that came with its
        address (a :class:`p2pgrid.limits.Guest`) also from that address's share of it,
        whatever names the address's callers used."""
        def entry(limit, spent):
            return {"limit": limit, "spent": spent, "left": max(0.0, limit - spent)}

        if pooled:
            spent_pool = db.execute("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE pooled = 1"
                                    ).fetchone()[0]
            limit = self._setting_in(db, "guest_epsilon", None)
            if limit is None:
                limit = self._setting_in(db, "default_epsilon", DEFAULT_EPSILON)
            out = {"unregistered": entry(float(limit), spent_pool)}
            address = _address(pooled)
            if address:
                spent_here = db.execute("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE "
                                        "pooled = 1 AND address = ?", (address,)).fetchone()[0]
                out["address"] = entry(pooled.cap(float(limit)), spent_here)
        else:
            spent_user = db.execute("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE user = ?",
                                    (user,)).fetchone()[0]
            out = {"user": entry(self._user_limit(db, user), spent_user)}
        if object_id is None:
            return out
        cap = db.execute("SELECT epsilon FROM budgets WHERE user = ? AND object_id = ?",
                         (user, object_id)).fetchone()
        if cap:
            spent = db.execute("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE user = ? AND "
                               "object_id = ?", (user, object_id)).fetchone()[0]
            out["user_dataset"] = entry(cap[0], spent)
        ds = db.execute("SELECT epsilon FROM datasets WHERE object_id = ?", (object_id,)).fetchone()
        if ds and ds[0] is not None:
            spent = db.execute("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE object_id = ?",
                               (object_id,)).fetchone()[0]
            out["dataset"] = entry(ds[0], spent)
        return out

    def remaining(self, user: str, object_id: str | None = None, *,
                  pooled: bool | Guest | None = False) -> dict:
        """The limits that apply to `user` (on `object_id`), and the tightest one left."""
        with self._reader() as db:
            db.execute("BEGIN")  # the limits and what is spent, from one snapshot
            try:
                limits = self._limits(db, user, object_id, pooled)
            finally:
                db.execute("COMMIT")
        return {**limits, "remaining": min(v["left"] for v in limits.values())}

    def charge(self, *, user: str, object_id: str, epsilon: float, release_id: str,
               query: dict, value: bytes,
               pooled: bool | Guest | None = False) -> tuple[bytes, dict, bool]:
        """Charge `epsilon` and store the release `value`, atomically; or raise
        PrivacyBudgetExceeded and store nothing. A `release_id` seen before (a retry
        after a lost reply) returns the stored release, charged once. `pooled`: the
        caller is unregistered and spends from the budget all such callers share (a
        Guest: and from its address's share of it).
        Returns (value, remaining limits, replayed)."""
        epsilon = check_epsilon(epsilon)
        if not isinstance(release_id, str) or not 16 <= len(release_id) <= 64:
            raise BadRequest("release_id must be 16 to 64 characters")
        with self._tx() as db:
            old = db.execute("SELECT user, object_id, value FROM ledger WHERE release_id = ?",
                             (release_id,)).fetchone()
            if old is not None:
                if (old[0], old[1]) != (user, object_id):
                    raise Conflict("release id already used")
                return bytes(old[2]), self._limits(db, user, object_id, pooled), True
            limits = self._limits(db, user, object_id, pooled)
            short = {k: v for k, v in limits.items() if v["spent"] + epsilon > v["limit"] + SLACK}
            if short:
                left = min(v["left"] for v in limits.values())
                label = {"user": f"{user}'s total", "user_dataset": f"{user}'s budget on {object_id}",
                         "dataset": f"the total of dataset {object_id}",
                         "unregistered": "the total all unregistered users share",
                         "address": "the share of it unregistered users at this address may "
                                    "spend together"}
                why = "; ".join(f"{label[k]}: {v['left']:.6g} of {v['limit']:.6g} left"
                                for k, v in short.items())
                raise PrivacyBudgetExceeded(
                    f"privacy budget exceeded: asked for epsilon={epsilon:g}, {why}",
                    requested=epsilon, remaining=left, **limits)
            db.execute("INSERT INTO ledger (release_id, user, object_id, epsilon, time, query, "
                       "value, pooled, address) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (release_id, user, object_id, epsilon, time.time(), json.dumps(query), value,
                        int(bool(pooled)), _address(pooled)))
            for v in limits.values():
                v["spent"] += epsilon
                v["left"] = max(0.0, v["limit"] - v["spent"])
            self._append(db, {"action": "release", "caller": user, "object": object_id,
                              "epsilon": epsilon, "release": release_id, "query": query,
                              "left": min(v["left"] for v in limits.values())})
        return value, limits, False

    def spent(self, user: str | None = None, object_id: str | None = None) -> float:
        where, args = ["1"], []
        if user is not None:
            where.append("user = ?")
            args.append(user)
        if object_id is not None:
            where.append("object_id = ?")
            args.append(object_id)
        return self._read(f"SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE {' AND '.join(where)}",
                          args)[0][0]

    def pooled_spent(self, address: str | None = None) -> float:
        """Epsilon spent by unregistered callers, all together (or those at `address`,
        a :func:`p2pgrid.limits.address_key`)."""
        if address is None:
            return self._read("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE pooled = 1"
                              )[0][0]
        return self._read("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE pooled = 1 AND "
                          "address = ?", (address,))[0][0]

    def ledger(self, limit: int = 50) -> list[dict]:
        rows = self._read("SELECT release_id, user, object_id, epsilon, time, query FROM ledger "
                          "ORDER BY time DESC LIMIT ?", (limit,))
        return [dict(zip(("release_id", "user", "object_id", "epsilon", "time"), r[:5]),
                     query=json.loads(r[5])) for r in rows]


def _address(pooled) -> str:
    """The address a pooled charge is counted under ("" for none)."""
    return pooled.address if isinstance(pooled, Guest) else ""


def _check_limit(epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) \
            or not math.isfinite(epsilon) or epsilon < 0:
        raise BadRequest(f"a budget is a non-negative epsilon, got {epsilon!r}")
    return float(epsilon)
