"""What the console's pages show: plain values for the templates, read from the peer.

Nothing here writes; the templates (``templates/``, autoescaped) only lay these out.
Numbers are rounded for people here (:func:`num`), so no page shows
``0.10000000000000009``; budget bars are computed here (:func:`bar`), so a ``0 / 0``
budget is an empty bar, not a full red one.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from dataclasses import dataclass

log = logging.getLogger("p2pgrid.web")

AUDIT_PAGE = 50
_HIDDEN = ("seq", "time", "action", "caller", "peer", "hash")
_METRICS = ("loss", "eval_loss", "accuracy", "epsilon")
COLOURS = {"loss": "#3b5bdb", "eval_loss": "#ae3ec9", "accuracy": "#2b8a3e", "epsilon": "#e67700"}


# ------------------------------------------------------------------ numbers and times

def num(x) -> str:
    """A number as a person reads it: 0.1 + 0.2 -> '0.3', 2.0 -> '2', 1234.5 -> '1,234.5',
    0.000012 -> '1.2e-05'; anything else as text."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.1f}".removesuffix(".0")
    if abs(x) < 1e-3:
        return f"{x:.2g}"
    return f"{float(f'{x:.4g}'):g}"


def age(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    return f"{s // 3600}h {s % 3600 // 60}m {s % 60}s" if s >= 3600 else f"{s // 60}m {s % 60}s"


def when(t) -> str:
    if not t:
        return ""
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def short(v, n: int = 80) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"


def names(items) -> str:
    """A rule's names for people: 'nobody', 'anyone', or 'bob, ana'."""
    if not items:
        return "nobody"
    return ", ".join("anyone" if n == "*" else n for n in items)


@dataclass(frozen=True)
class Bar:
    """A budget: `label` ('0.5 / 5'), `percent` filled, `full` when nothing is left."""
    label: str
    percent: int
    full: bool
    capped: bool


def bar(spent: float, limit: float | None) -> Bar:
    """`spent` of `limit` (None: no cap). A limit of 0 with nothing spent is an empty bar
    (nothing granted yet, nothing used), not a full one."""
    spent = float(spent or 0.0)
    if limit is None:
        return Bar(f"{num(spent)} spent, no cap", 0, False, False)
    if limit <= 0:
        return Bar(f"{num(spent)} / {num(limit)}", 0 if spent <= 0 else 100, spent > 0, True)
    frac = min(max(spent / limit, 0.0), 1.0)
    return Bar(f"{num(spent)} / {num(limit)}", round(frac * 100), spent >= limit, True)


# ------------------------------------------------------------------ public facts

def peer_header(peer) -> dict:
    return {"name": peer.name, "uptime": age(time.time() - peer.started_at),
            "address": peer.address or "", "key_id": peer.key_id}


def models(peer) -> list[tuple[str, str]]:
    """(name, details) of each model this peer announces: the serving plugin's
    ``services["serving"]["models"]`` entries, and any other announced service."""
    rows = []
    for key, info in sorted((peer.services or {}).items(), key=lambda kv: str(kv[0])):
        items = info.get("models") if isinstance(info, dict) else None
        if key == "serving" and isinstance(items, list):
            for m in items:
                if not isinstance(m, dict):
                    continue
                bits = [f"role: {m.get('role', '')}"]
                if isinstance(m.get("size"), int):
                    bits.append(f"{m['size'] / 1e6:.2f} MB")
                if m.get("hash"):
                    bits.append(str(m["hash"])[:12])
                if isinstance(m.get("terms"), dict):
                    bits.append("terms: " + short(m["terms"], 100))
                rows.append((f"{m.get('owner', '?')}/{m.get('name', '?')}", " · ".join(bits)))
            continue
        if isinstance(info, dict):
            desc = "; ".join(f"{k}: {short(v)}" for k, v in list(info.items())[:6])
        else:
            desc = short(info)
        rows.append((str(key), desc))
    return rows


def peers(peer) -> dict:
    recs = sorted(peer.directory.peers(), key=lambda r: peer.directory.label(r))
    m = getattr(peer, "membership", None)
    return {"network": m.network if m is not None else None,
            "rows": [{"label": peer.directory.label(r), "key_id": r.key_id,
                      "self": r.key_id == peer.key_id, "addresses": ", ".join(r.addresses),
                      "roles": ", ".join(r.roles), "objects": len(r.objects)} for r in recs]}


def public(peer) -> dict:
    """The public page: facts this peer already announces to the network."""
    summaries = list(peer._summaries.values())
    served = models(peer)
    return {"peer": peer_header(peer), "models": served, "peers": peers(peer),
            "datasets": [{"id": s.id, "tags": list(s.tags), "shape": str(tuple(s.shape)),
                          "dtype": s.dtype, "description": s.description} for s in summaries],
            "cards": [("peers known", len(peer.directory.peers())), ("datasets", len(summaries)),
                      ("models served", len(served))]}


# ------------------------------------------------------------------ training curves

def training_runs(ext) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """Runs of the federated plugin's state, duck-typed: an object or dict with ``runs``
    (a dict or list, or a callable giving one) whose items have a ``history`` of rounds
    (objects with ``to_dict()`` or dicts with ``round`` and numeric metrics)."""
    if ext is None:
        return []
    runs = ext.get("runs") if isinstance(ext, dict) else getattr(ext, "runs", None)
    if callable(runs):
        runs = runs()
    items = list(runs.items()) if isinstance(runs, dict) else list(enumerate(runs or []))
    out = []
    for key, run in items[-6:]:
        if isinstance(run, dict):
            history, name = run.get("history") or run.get("rounds"), run.get("job") or run.get("name")
        elif isinstance(run, list):
            history, name = run, None
        else:
            history, name = getattr(run, "history", None), getattr(run, "job", None)
        series: dict[str, list[tuple[float, float]]] = {}
        for i, rec in enumerate(history or []):
            d = rec.to_dict() if hasattr(rec, "to_dict") else rec if isinstance(rec, dict) else {}
            rnd = d.get("round", i + 1)
            for metric in _METRICS:
                v = d.get(metric)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    series.setdefault(metric, []).append((float(rnd), float(v)))
        if series:
            out.append((str(name or key), series))
    return out


def chart(title: str, points: list[tuple[float, float]], colour: str) -> dict:
    """An SVG line chart's coordinates (the template draws it)."""
    w, h, pad = 300, 130, 28
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y):
        return h - pad + (y0 - y) / (y1 - y0) * (h - 2 * pad)

    return {"title": title, "colour": colour, "w": w, "h": h, "pad": pad,
            "line": " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points),
            "dots": [(f"{sx(x):.1f}", f"{sy(y):.1f}") for x, y in points],
            "y0": num(y0), "y1": num(y1), "x0": num(x0), "x1": num(x1)}


def coordinated(peer) -> list[dict]:
    """Federated runs this peer coordinated, with a chart per metric."""
    try:
        runs = training_runs(peer.extensions.get("federated"))
    except Exception:  # another plugin's state: never let it break the page
        log.exception("reading federated runs")
        runs = []
    return [{"name": name, "charts": [chart(metric.replace("_", " "), pts, COLOURS.get(metric, "#495057"))
                                      for metric, pts in series.items()]} for name, series in runs]


def trained_here(store, limit: int = 2000) -> list[dict]:
    """Federated training that ran on this peer's data, whoever coordinated it: one row
    per (coordinator, job), from the audit trail's ``federated.train`` and
    ``federated.evaluate`` entries (newest job first)."""
    jobs: dict[tuple, dict] = {}
    for e in store.audit_page(action="federated.", limit=limit):
        if e.get("action") not in ("federated.train", "federated.evaluate"):
            continue
        key = (str(e.get("caller") or ""), str(e.get("job") or ""))
        j = jobs.setdefault(key, {"caller": key[0], "job": key[1], "rounds": set(), "evals": 0,
                                  "objects": set(), "examples": 0, "secure": False,
                                  "first": e.get("time"), "last": e.get("time")})
        t = e.get("time") or 0
        j["first"] = min(j["first"] or t, t)
        j["last"] = max(j["last"] or t, t)
        j["objects"].update(str(o) for o in e.get("objects") or ())
        if e["action"] == "federated.evaluate":
            j["evals"] += 1
            continue
        if isinstance(e.get("round"), int):
            j["rounds"].add(e["round"])
        if isinstance(e.get("examples"), int):
            j["examples"] = max(j["examples"], e["examples"])
        j["secure"] = j["secure"] or bool(e.get("secure"))
    rows = sorted(jobs.values(), key=lambda j: j["last"] or 0, reverse=True)
    return [{**j, "rounds": len(j["rounds"]), "last_round": max(j["rounds"], default=None),
             "objects": ", ".join(sorted(j["objects"])), "first": when(j["first"]),
             "last": when(j["last"])} for j in rows]


# ------------------------------------------------------------------ the owner's page

def requests(store) -> dict:
    pending = [{**r, "asks": "download (get)" if r["epsilon"] is None and r["right"] == "get"
                else "release of a program" if r["right"] == "program"
                else f"privacy budget ε = {num(r['epsilon'])}", "filed": when(r["created"])}
               for r in store.requests("pending")]
    recent = [{**r, "when": when(r["decided"])} for r in store.requests(None, limit=10)
              if r["status"] != "pending"]
    return {"pending": pending, "recent": recent}


def datasets(metas, store) -> list[dict]:
    dp = store.datasets()
    rows = []
    for m in metas:
        r = m.rules
        d = dp.get(m.id)
        rows.append({"id": m.id, "tags": list(m.tags), "shape": str(tuple(m.shape)),
                     "dtype": m.dtype, "description": m.description,
                     "columns": list(getattr(m, "columns", None) or ()),
                     "rules": {"compute": names(r.compute), "get": names(r.get),
                               "aggregate": names(r.aggregate), "min_rows": r.min_rows},
                     "edit": {"compute": ", ".join(r.compute), "get": ", ".join(r.get),
                              "aggregate": ", ".join(r.aggregate), "min_rows": r.min_rows},
                     "bar": bar(d["spent"], d["epsilon"]) if d else None,
                     "bounds": " ".join(f"{num(lo)}:{num(hi)}" for lo, hi in d["bounds"]) if d else "",
                     "total": "" if not d or d["epsilon"] is None else num(d["epsilon"])})
    return rows


def users(store) -> dict:
    from ..governance.actions import MODES, mode
    from ..governance.roles import format_key
    from ..governance.store import DEFAULT_EPSILON

    caps = {(b["user"], b["object_id"]): b["epsilon"] for b in store.budgets()}
    default = store.setting("default_epsilon", DEFAULT_EPSILON)
    guests = store.setting("guest_epsilon")
    rows = []
    for u in sorted(store.users().values(), key=lambda u: (u.role, u.name)):
        limit = caps.get((u.name, None), default)
        rows.append({"name": u.name, "role": u.role,
                     "key": format_key(u.public_key)[:16] + "…" if u.public_key else None,
                     "bar": bar(store.spent(u.name), limit), "own_budget": (u.name, None) in caps})
    dataset_caps = [{"user": b["user"], "object_id": b["object_id"], "epsilon": num(b["epsilon"]),
                     "bar": bar(store.spent(b["user"], b["object_id"]), b["epsilon"])}
                    for b in store.budgets() if b["object_id"] is not None]
    return {"rows": rows, "mode": mode(store), "modes": MODES, "default": num(default),
            "guests": "" if guests is None else num(guests),
            "pool": bar(store.pooled_spent(), default if guests is None else guests),
            "caps": dataset_caps}


def grants(store) -> list[dict]:
    return [{**g, "granted": when(g["granted"])} for g in store.grants()]


def audit_rows(entries) -> list[dict]:
    return [{"seq": e.get("seq", ""), "time": when(e.get("time")), "action": str(e.get("action", "")),
             "caller": str(e.get("caller") or ""),
             "details": short({k: v for k, v in e.items() if k not in _HIDDEN}, 160)}
            for e in entries]


def chain(store, public_key: bytes) -> dict:
    v = store.verify(public_key, incremental=True)
    return {"ok": v.ok, "entries": v.entries, "head": v.head[:16], "problems": v.problems[:3]}


def owner(peer, gov, metas) -> dict:
    """Everything the owner's page shows (runs in a worker thread: SQLite reads)."""
    store = gov.store
    base = public(peer)
    req = requests(store)
    people = users(store)
    return {**base, "owner": True, "requests": req, "mine": datasets(metas, store),
            "users": people, "grants": grants(store), "coordinated": coordinated(peer),
            "trained_here": trained_here(store),
            "audit": audit_rows(store.audit_page(limit=25)),
            "chain": chain(store, peer.identity.public_bytes),
            "cards": [("peers known", len(peer.directory.peers())), ("datasets", len(metas)),
                      ("models served", len(base["models"])),
                      ("pending requests", len(req["pending"])), ("users", len(people["rows"]))]}


def audit(peer, gov, *, before=None, after=None, action=None, caller=None) -> dict:
    """One page of the audit trail, filtered; links to the older and newer pages."""
    store = gov.store
    entries = store.audit_page(before=before, after=after, action=action or None,
                               caller=caller or None, limit=AUDIT_PAGE + 1)
    if after is not None and before is None:
        more_newer, entries = len(entries) > AUDIT_PAGE, entries[-AUDIT_PAGE:]
        more_older = bool(entries) and bool(store.audit_page(
            before=entries[-1]["seq"], action=action or None, caller=caller or None, limit=1))
    else:
        more_older, entries = len(entries) > AUDIT_PAGE, entries[:AUDIT_PAGE]
        more_newer = bool(entries) and bool(store.audit_page(
            after=entries[0]["seq"], action=action or None, caller=caller or None, limit=1))
    return {"peer": peer_header(peer), "owner": True, "rows": audit_rows(entries),
            "filters": {"action": action or "", "caller": caller or ""},
            "older": entries[-1]["seq"] if entries and more_older else None,
            "newer": entries[0]["seq"] if entries and more_newer else None,
            "chain": chain(store, peer.identity.public_bytes)}
