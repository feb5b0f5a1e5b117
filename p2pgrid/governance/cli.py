"""The owner's commands: ``p2pgrid users|requests|budget|audit|web``.

They act on the peer's data directory (``--data-dir``, or ``--peer NAME`` for
``$P2PGRID_HOME/NAME``) directly: the governance database is shared safely with
the running peer (SQLite, WAL, one writer at a time), which picks decisions up
within half a second. Owning the data directory is what makes one the owner.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import default_home
from ..errors import P2PError

BY = "owner (cli)"


from .actions import MODES as _MODES

def _target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which peer")
    g.add_argument("--peer", metavar="NAME", help="the peer's name: its data is $P2PGRID_HOME/NAME (default: the only "
                   "peer there, if there is just one)")
    g.add_argument("--data-dir", type=Path, help="the peer's data directory")


def _data_dir(args) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    if args.peer:
        return default_home() / args.peer
    home = default_home()
    peers = sorted(d for d in home.iterdir() if (d / "store" / "objects.db").exists()) \
        if home.is_dir() else []
    if len(peers) == 1:  # the usual case: one peer on this machine
        return peers[0]
    known = f" (peers here: {', '.join(d.name for d in peers)})" if peers else \
        f" (no peer has run under {home} yet)"
    raise SystemExit(f"give --peer NAME or --data-dir DIR: the peer whose owner you are{known}")


def _store(args):
    from .store import GovernanceStore

    data = _data_dir(args)
    if not data.exists():
        raise SystemExit(f"no peer data at {data}; start the peer once, or check --data-dir")
    return GovernanceStore(data / "governance.db")


def _public_key(data: Path) -> bytes | None:
    from ..identity import Identity

    path = data / "identity.key"
    return Identity.load_or_create(path).public_bytes if path.exists() else None


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""


def add_cli(sub) -> dict:
    fmt = argparse.RawDescriptionHelpFormatter

    u = sub.add_parser("users", help="register users and their roles (owner)", formatter_class=fmt,
                       description="Users registered on your peer, each with a role: owner (everything),"
                                   " scientist (search, compute, file requests), guest (search). A "
                                   "registered name is pinned to its key. With no users the peer is "
                                   "open: names bind on first use and object rules decide.",
                       epilog="examples:\n  p2pgrid users add bob --role scientist --key=KEY --peer "
                              "hospital\n  p2pgrid users key --as bob        (bob prints his key)\n"
                              "  p2pgrid users mode registered --peer hospital")
    us = u.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = us.add_parser("add", help="register NAME (again: change its role or key)")
    a.add_argument("user")
    a.add_argument("--role", required=True, choices=("owner", "scientist", "guest"),
                   help="owner (everything), scientist (search, compute, requests), guest (search)")
    a.add_argument("--key", help="the user's public key (`p2pgrid users key` prints it); write "
                                 "--key=KEY, as a key may begin with '-'; default: bound to the "
                                 "first key that calls with this name")
    _target(a)
    r = us.add_parser("remove", help="unregister NAME")
    r.add_argument("user")
    _target(r)
    ls = us.add_parser("list", help="list users")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _target(ls)
    m = us.add_parser("mode", help="open (default), registered (registered users only), or "
                                   "releases (others may search and compute; only registered "
                                   "users take anything out)")
    m.add_argument("mode", choices=("open", "registered", "releases"))
    _target(m)
    st = us.add_parser("storage", help="who may store objects here: registered (default) or anyone")
    st.add_argument("who", choices=("registered", "anyone"))
    _target(st)
    k = us.add_parser("key", help="print YOUR public key, to give to a peer's owner")
    k.add_argument("--as", dest="name", help="your name (your data is $P2PGRID_HOME/NAME)")
    k.add_argument("--data-dir", type=Path, help="your peer's data directory")

    q = sub.add_parser("requests", help="list, approve and deny access requests (owner)",
                       formatter_class=fmt,
                       description="Requests scientists filed with your peer: for `get` on an "
                                   "object, or for more privacy budget on a dataset.",
                       epilog="examples:\n  p2pgrid requests list --peer hospital\n"
                              "  p2pgrid requests approve 3f9a1c2b7d10 --peer hospital\n"
                              "  p2pgrid requests deny 3f9a1c2b7d10 --why 'too broad' --peer hospital")
    qs = q.add_subparsers(dest="action", required=True, metavar="ACTION")
    ql = qs.add_parser("list", help="pending requests (--all: every request)")
    ql.add_argument("--all", action="store_true", help="decided requests too")
    ql.add_argument("--json", action="store_true", help="print JSON")
    _target(ql)
    for name in ("approve", "deny"):
        d = qs.add_parser(name, help=f"{name} request ID")
        d.add_argument("id")
        d.add_argument("--why", default="", required=name == "deny",
                       help="your reason, shown to the requester")
        _target(d)
    qg = qs.add_parser("grants", help="what approved requests granted (get, release)")
    qg.add_argument("--json", action="store_true", help="print JSON")
    _target(qg)
    qr = qs.add_parser("revoke", help="take back USER's grant on OBJECT (at once)")
    qr.add_argument("user", help="who holds the grant")
    qr.add_argument("object", help="the object id (or program id, for --right release)")
    qr.add_argument("--right", default="get", choices=("get", "release"),
                    help="which grant (default: get)")
    _target(qr)

    b = sub.add_parser("budget", help="privacy budgets and dataset bounds (owner)", formatter_class=fmt,
                       description="Differential privacy: declare each dataset's column bounds (private "
                                   "queries need them), set each user's total epsilon (default: "
                                   "`budget default`, 0 until set), optionally per dataset.",
                       epilog="examples:\n  p2pgrid budget bounds births-2024-02 0:6 30:65 20:45 "
                              "--total 10 --peer hospital\n  p2pgrid budget set bob 1.0 --peer "
                              "hospital\n  p2pgrid budget set bob 0.5 --dataset births-2024-02 --peer "
                              "hospital\n  p2pgrid budget show --peer hospital\n"
                              "(negative bounds: put -- before them, as in `bounds ID -- -5:5`)")
    bs = b.add_subparsers(dest="action", required=True, metavar="ACTION")
    bset = bs.add_parser("set", help="USER's total epsilon (or cap on --dataset)")
    bset.add_argument("user")
    bset.add_argument("epsilon", type=float)
    bset.add_argument("--dataset", help="cap USER's spending on this dataset instead")
    _target(bset)
    bd = bs.add_parser("default", help="total epsilon of registered users with no budget of "
                                       "their own, and of all unregistered callers together")
    bd.add_argument("epsilon", type=float)
    _target(bd)
    bg = bs.add_parser("guests", help="total epsilon all unregistered callers share "
                                      "(default: the default budget)")
    bg.add_argument("epsilon", type=float)
    _target(bg)
    bb = bs.add_parser("bounds", help="declare a dataset's column bounds LO:HI (one, or one per column)")
    bb.add_argument("dataset")
    bb.add_argument("bounds", nargs="+", metavar="LO:HI")
    bb.add_argument("--total", type=float, help="the dataset's total epsilon, all users together")
    _target(bb)
    bsh = bs.add_parser("show", help="datasets, budgets and what is spent")
    bsh.add_argument("--json", action="store_true", help="print JSON")
    _target(bsh)

    au = sub.add_parser("audit", help="show or verify the audit trail (owner)", formatter_class=fmt,
                        description="Every search, compute, get, request, decision, model call and "
                                    "budget charge, in a hash-chained log. --verify recomputes the "
                                    "chain and checks the peer's signed checkpoints.",
                        epilog="examples:\n  p2pgrid audit --verify --peer hospital\n"
                               "  p2pgrid audit tail -n 50 --peer hospital")
    au.add_argument("what", nargs="?", choices=("tail", "verify"), default="tail")
    au.add_argument("--verify", action="store_true", help="check the chain (exit 1 if broken)")
    au.add_argument("-n", type=int, default=20, help="entries to show (default 20)")
    au.add_argument("--json", action="store_true", help="print JSON")
    _target(au)

    w = sub.add_parser("web", help="the peer's console: login link, address, token (owner)",
                       formatter_class=fmt,
                       description="Each peer serves a console for browsers (plain HTTP on "
                                   "127.0.0.1 by default; TLS with its own certificate elsewhere).",
                       epilog="examples:\n  p2pgrid web url --peer hospital\n"
                              "  p2pgrid web config --port 8080 --peer hospital\n"
                              "  p2pgrid web token --rotate --peer hospital")
    ws = w.add_subparsers(dest="action", required=True, metavar="ACTION")
    wu = ws.add_parser("url", help="print the login link")
    _target(wu)
    wc = ws.add_parser("config", help="where the console listens (from the next start)")
    wc.add_argument("--host", help="address (default 127.0.0.1; others get TLS)")
    wc.add_argument("--port", type=int, help="port (0: the last one, else any)")
    wc.add_argument("--off", dest="enabled", action="store_false", default=None,
                    help="do not serve the console")
    wc.add_argument("--on", dest="enabled", action="store_true", help="serve the console")
    _target(wc)
    wt = ws.add_parser("token", help="print the login token (--rotate: make a new one)")
    wt.add_argument("--rotate", action="store_true", help="make a new token (the old one "
                    "stops working when the peer restarts)")
    _target(wt)

    return {"users": _runner(_users), "requests": _runner(_requests), "budget": _runner(_budget),
            "audit": _runner(_audit), "web": _runner(_web)}


def _runner(fn):
    async def run(args) -> int:
        try:
            return fn(args)
        except P2PError as e:
            print(f"p2pgrid {args.command}: {e.message}", file=sys.stderr)
            return 1
    return run


# ------------------------------------------------------------------ users

def _users(args) -> int:
    from . import actions
    from .roles import format_key

    if args.action == "key":
        from ..identity import Identity

        if args.data_dir:
            data = Path(args.data_dir)
        else:
            import os
            data = default_home() / (args.name or os.environ.get("USER") or "cli")
        ident = Identity.load_or_create(data / "identity.key")
        print(format_key(ident.public_bytes))
        return 0
    store = _store(args)
    try:
        if args.action == "add":
            user = actions.add_user(store, args.user, args.role, args.key, by=BY)
            print(f"{user.name}: {user.role}" + ("" if args.key else " (key bound on first use)"))
        elif args.action == "remove":
            actions.remove_user(store, args.user, by=BY)
            print(f"removed {args.user}")
        elif args.action == "storage":
            actions.set_storage(store, args.who, by=BY)
            print(f"storing objects: {'anyone (within quotas)' if args.who == 'anyone' else 'registered users only'}")
        elif args.action == "mode":
            actions.set_mode(store, args.mode, by=BY)
            print(f"mode: {_MODES[args.mode]}")
        else:
            users = sorted(store.users().values(), key=lambda u: (u.role, u.name))
            if args.json:
                print(json.dumps([{"name": u.name, "role": u.role, "added": u.added,
                                   "key": format_key(u.public_key) if u.public_key else None}
                                  for u in users], indent=2))
            else:
                print(f"mode: {_MODES[actions.mode(store)]}; {len(users)} user(s)")
                for u in users:
                    key = format_key(u.public_key) if u.public_key else "(bound on first use)"
                    print(f"  {u.name:<16} {u.role:<10} {key}")
        return 0
    finally:
        store.close()


# ------------------------------------------------------------------ requests

def _requests(args) -> int:
    store = _store(args)
    try:
        if args.action == "list":
            items = store.requests(None if args.all else "pending")
            if args.json:
                print(json.dumps([{k: v for k, v in r.items()} for r in items], indent=2))
                return 0
            if not items:
                print("no pending requests" if not args.all else "no requests")
                return 0
            for r in items:
                what = "get" if r["epsilon"] is None else f"epsilon {r['epsilon']:g}"
                print(f"{r['id']}  {r['status']:<8} {r['user']:<12} {r['object_id']:<24} {what:<14} "
                      f"{_when(r['created'])}  {r['reason']}")
                if r["why"]:
                    print(f"{'':<14}why: {r['why']}")
            return 0
        if args.action == "grants":
            grants = store.grants()
            if args.json:
                print(json.dumps(grants, indent=2))
            elif not grants:
                print("no grants")
            for g in [] if args.json else grants:
                print(f"{g['user']:<16} {g['right']:<8} {g['object_id']:<24} {_when(g['granted'])}"
                      f"  request {g['request_id']}")
            return 0
        if args.action == "revoke":
            from .actions import revoke_grant
            revoke_grant(store, args.user, args.object, args.right, by=BY)
            print(f"revoked {args.user}'s {args.right} on {args.object}")
            return 0
        req = store.decide(args.id, approve=args.action == "approve", why=args.why, by=BY)
        print(f"request {req['id']} of {req['user']} on {req['object_id']}: {req['status']}")
        return 0
    finally:
        store.close()


# ------------------------------------------------------------------ budgets

def _budget(args) -> int:
    from . import actions

    store = _store(args)
    try:
        if args.action == "set":
            actions.set_budget(store, args.user, args.epsilon, args.dataset, by=BY)
            where = f" on {args.dataset}" if args.dataset else " in total"
            print(f"{args.user}: epsilon {args.epsilon:g}{where}")
        elif args.action == "default":
            actions.set_default_budget(store, args.epsilon, by=BY)
            print(f"default total epsilon: {args.epsilon:g}")
        elif args.action == "guests":
            actions.set_guest_budget(store, args.epsilon, by=BY)
            print(f"total epsilon of all unregistered callers together: {args.epsilon:g}")
        elif args.action == "bounds":
            bounds, _ = actions.set_bounds(store, args.dataset, args.bounds, args.total, by=BY)
            total = f", total epsilon {args.total:g}" if args.total is not None else ""
            print(f"{args.dataset}: bounds {bounds.to_list()}{total}")
        else:
            from .store import DEFAULT_EPSILON
            out = {"default_epsilon": store.setting("default_epsilon", DEFAULT_EPSILON),
                   "guest_epsilon": store.setting("guest_epsilon"),
                   "unregistered_spent": store.pooled_spent(),
                   "datasets": store.datasets(), "budgets": store.budgets(),
                   "spent": {u: store.spent(u) for u in sorted({b["user"] for b in store.budgets()}
                                                              | set(store.users()))}}
            if args.json:
                print(json.dumps(out, indent=2))
                return 0
            print(f"default total epsilon per user: {out['default_epsilon']:g}")
            guests = out["guest_epsilon"]
            print(f"unregistered callers together: "
                  f"{out['default_epsilon'] if guests is None else guests:g} "
                  f"({out['unregistered_spent']:g} spent)")
            print("datasets:")
            for oid, d in sorted(out["datasets"].items()):
                total = f"{d['epsilon']:g}" if d["epsilon"] is not None else "no cap"
                print(f"  {oid:<24} spent {d['spent']:.4g} of {total}   bounds {d['bounds']}")
            print("budgets:")
            for bu in out["budgets"]:
                where = bu["object_id"] or "total"
                print(f"  {bu['user']:<16} {where:<24} {bu['epsilon']:g}")
            print("spent:")
            for user, spent in out["spent"].items():
                print(f"  {user:<16} {spent:.4g}")
        return 0
    finally:
        store.close()


# ------------------------------------------------------------------ audit

def _audit(args) -> int:
    store = _store(args)
    try:
        if args.verify or args.what == "verify":
            verdict = store.verify(_public_key(_data_dir(args)))
            if args.json:
                print(json.dumps({"ok": verdict.ok, "entries": verdict.entries, "head": verdict.head,
                                  "checkpoints": verdict.checkpoints, "problems": verdict.problems}))
            else:
                print(verdict)
            return 0 if verdict.ok else 1
        entries = store.audit_tail(args.n)
        if args.json:
            print(json.dumps(entries, indent=2))
            return 0
        for e in entries:
            extra = {k: v for k, v in e.items()
                     if k not in ("seq", "time", "action", "caller", "peer", "hash")}
            print(f"{e.get('seq', ''):>6} {_when(e.get('time'))} {e.get('action', ''):<16} "
                  f"{e.get('caller') or '':<14} {json.dumps(extra, default=str)}")
        return 0
    finally:
        store.close()


# ------------------------------------------------------------------ web

def _web(args) -> int:
    from .policy import console_token

    data = _data_dir(args)
    if args.action == "token":
        print(console_token(data, rotate=args.rotate))
        if args.rotate:
            print("(a running peer keeps the old token until it restarts)", file=sys.stderr)
        return 0
    store = _store(args)
    try:
        console = dict(store.setting("console", {}) or {})
        if args.action == "config":
            for key in ("host", "port", "enabled"):
                if getattr(args, key) is not None:
                    console[key] = getattr(args, key)
            store.set_setting("console", console, by=BY)
            print(f"console: {console} (from the next start)")
            return 0
        host = console.get("host", "127.0.0.1")
        try:
            port = int((data / "console-port").read_text())
        except (OSError, ValueError):
            print("the console has not run yet; start the peer", file=sys.stderr)
            return 1
        scheme = "http" if host.startswith("127.") or host in ("localhost", "::1") else "https"
        print(f"{scheme}://{host}:{port}/login?token={console_token(data)}")
        return 0
    finally:
        store.close()
