"""The peer's web page: public status for anyone, the owner's console behind a login.

Two listeners serve it. The peer's own port (HTTP/2 over TLS with the peer's
Ed25519 certificate, which browsers do not accept yet) answers ``GET /`` with the
public page through ``peer.page``. The console listener, started by the
governance service, serves the same page to browsers: plain HTTP on 127.0.0.1 by
default, TLS with an ECDSA certificate of its own when told to listen elsewhere.

Public: name, status, uptime, the peers it knows, what it advertises (dataset ids,
tags, shapes, descriptions), the models it serves. Owner only: access rules and
privacy budgets, users, pending requests with approve/deny buttons, training runs,
the audit tail. The owner logs in with the token in ``DATA_DIR/console-token``
(printed when the peer starts); sessions are HttpOnly SameSite=Strict cookies and
every form carries a per-session CSRF token, checked with the request's origin.
"""

from __future__ import annotations

import datetime
import hmac
import html
import json
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote

import trio

from .server import handle_lifespan

log = logging.getLogger("p2pgrid.web")

SESSION_TTL = 12 * 3600.0
MAX_FORM = 64 * 1024
LOGIN_FAILURES = 20  # per minute, then 429
_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")
esc = html.escape


# ------------------------------------------------------------------ formatting

def _fmt_age(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    return f"{s // 3600}h {s % 3600 // 60}m {s % 60}s" if s >= 3600 else f"{s // 60}m {s % 60}s"


def _fmt_time(t: float | None) -> str:
    if not t:
        return ""
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_num(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return esc(str(x))


def _tags(tags) -> str:
    return " ".join(f'<span class="tag">#{esc(t)}</span>' for t in tags)


def _names(names) -> str:
    if not names:
        return '<span class="muted">nobody</span>'
    return ", ".join("anyone" if n == "*" else esc(n) for n in names)


# ------------------------------------------------------------------ page parts

_STYLE = """
:root{--bg:#f5f6fa;--card:#fff;--ink:#1d2330;--muted:#6b7385;--line:#e4e7ef;--accent:#3b5bdb;
--ok:#2b8a3e;--warn:#e67700;--bad:#c92a2a;--chip:#edf2ff}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{background:linear-gradient(120deg,#23305e,#3b5bdb);color:#fff;padding:1.4rem 2rem}
header h1{margin:0;font-size:1.7rem;letter-spacing:.01em}header .sub{opacity:.85;margin-top:.3rem}
header code{color:#dbe4ff}.pill{display:inline-block;border-radius:99px;padding:.05rem .6rem;
font-size:.8rem;font-weight:600;vertical-align:middle}.pill.on{background:#d3f9d8;color:#2b8a3e}
.pill.owner{background:#fff3bf;color:#8d5b00}.pill.bad{background:#ffe3e3;color:var(--bad)}
main{max-width:1180px;margin:0 auto;padding:1.4rem 1.2rem 3rem}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:.9rem;margin-bottom:1.2rem}
.stat{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:.9rem 1rem}
.stat b{display:block;font-size:1.6rem}.stat span{color:var(--muted);font-size:.85rem}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:1rem 1.2rem;
margin-bottom:1.2rem;box-shadow:0 1px 2px rgba(20,30,60,.04)}section h2{margin:.1rem 0 .8rem;
font-size:1.15rem}section h2 .count{color:var(--muted);font-weight:400}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid var(--line);
padding:.45rem .6rem;text-align:left;vertical-align:top}th{font-size:.8rem;text-transform:uppercase;
letter-spacing:.04em;color:var(--muted);font-weight:600}tr:last-child td{border-bottom:0}
code{font-size:.85em;color:#495057}.muted{color:var(--muted)}.tag{background:var(--chip);
color:#364fc7;border-radius:6px;padding:0 .35rem;margin-right:.2rem;font-size:.85em;white-space:nowrap}
.bar{background:#edf0f7;border-radius:99px;height:.55rem;width:9rem;overflow:hidden;margin-top:.2rem}
.bar i{display:block;height:100%;background:var(--accent)}.bar i.full{background:var(--bad)}
form.inline{display:flex;gap:.4rem;align-items:center;flex-wrap:wrap}
input[type=text],input[type=password]{border:1px solid #cfd5e3;border-radius:8px;padding:.4rem .6rem;
font:inherit;min-width:12rem}button{border:0;border-radius:8px;padding:.42rem .9rem;font:inherit;
font-weight:600;cursor:pointer}button.approve{background:var(--ok);color:#fff}
button.deny{background:#fff;color:var(--bad);border:1px solid #ffc9c9}button.primary{background:var(--accent);
color:#fff}button.ghost{background:rgba(255,255,255,.15);color:#fff;border:1px solid rgba(255,255,255,.4)}
.flash{background:#e7f5ff;border:1px solid #a5d8ff;border-radius:10px;padding:.6rem .9rem;margin-bottom:1rem}
.flash.err{background:#fff5f5;border-color:#ffc9c9}.topline{display:flex;justify-content:space-between;
align-items:flex-start;gap:1rem;flex-wrap:wrap}.charts{display:flex;flex-wrap:wrap;gap:1rem}
.chart{border:1px solid var(--line);border-radius:10px;padding:.5rem .7rem}.chart h3{margin:0 0 .3rem;
font-size:.9rem}.empty{color:var(--muted);font-style:italic}.audit td{font-size:.85rem}
.status-approved{color:var(--ok);font-weight:600}.status-denied{color:var(--bad);font-weight:600}
.status-pending{color:var(--warn);font-weight:600}footer{color:var(--muted);text-align:center;font-size:.8rem}
"""


def _page(title: str, header: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{esc(title)}</title><style>{_STYLE}</style></head><body>'
            f'{header}<main>{body}</main><footer>p2pgrid · peer-to-peer private ML</footer>'
            f'</body></html>')


def _header(peer, *, owner: bool, csrf: str = "") -> str:
    badge = '<span class="pill owner">owner</span>' if owner else ""
    logout = (f'<form method="post" action="/logout"><input type="hidden" name="csrf" '
              f'value="{esc(csrf)}"><button class="ghost" id="logout">Log out</button></form>'
              if owner else "")
    return (f'<header><div class="topline"><div><h1>{esc(peer.name)} '
            f'<span class="pill on" id="status">online</span> {badge}</h1>'
            f'<div class="sub">up <b id="uptime">{_fmt_age(time.time() - peer.started_at)}</b> · '
            f'{esc(peer.address or "")} · key <code>{esc(peer.key_id)}</code></div></div>'
            f'{logout}</div></header>')


def _cards(items: list[tuple[str, object]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="stat"><b>{esc(str(v))}</b><span>{esc(k)}</span></div>' for k, v in items) + "</div>"


def _section(id_: str, title: str, count: int | None, inner: str) -> str:
    c = f' <span class="count">({count})</span>' if count is not None else ""
    return f'<section id="{id_}"><h2>{esc(title)}{c}</h2>{inner}</section>'


def _table(head: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


def _peers_section(peer) -> str:
    recs = sorted(peer.directory.peers(), key=lambda r: peer.directory.label(r))
    rows = [f"<tr><td><b>{esc(peer.directory.label(r))}</b>"
            f"{' <span class=muted>(this peer)</span>' if r.key_id == peer.key_id else ''}</td>"
            f"<td><code>{esc(r.key_id)}</code></td><td>{esc(', '.join(r.addresses))}</td>"
            f"<td>{esc(', '.join(r.roles))}</td><td>{len(r.objects)}</td></tr>" for r in recs]
    m = getattr(peer, "membership", None)
    trust = (f"Names certified by network <code>{esc(m.network)}</code>." if m is not None else
             "Names are trusted on first use: compare key fingerprints, pin peers with "
             "<code>--join KEYID@HOST:PORT</code>, or run a network key.")
    return _section("peers", "Peers", len(recs),
                    f'<p class="muted" id="trust">{trust}</p>'
                    + _table(["name", "key", "address", "roles", "objects"], rows, "no peers known yet"))


def _models(peer) -> list[tuple[str, str]]:
    """(name, details as HTML) of each model this peer announces: the serving plugin's
    ``services["serving"]["models"]`` entries, and any other announced service."""
    rows = []
    for key, info in sorted((peer.services or {}).items(), key=lambda kv: str(kv[0])):
        models = info.get("models") if isinstance(info, dict) else None
        if key == "serving" and isinstance(models, list):
            for m in models:
                if not isinstance(m, dict):
                    continue
                name = f"{m.get('owner', '?')}/{m.get('name', '?')}"
                size = m.get("size")
                bits = [f"role: {esc(str(m.get('role', '')))}"]
                if isinstance(size, int):
                    bits.append(f"{size / 1e6:.2f} MB")
                if m.get("hash"):
                    bits.append(f"<code>{esc(str(m['hash'])[:12])}</code>")
                if isinstance(m.get("terms"), dict):
                    bits.append("terms: " + esc(_short(m["terms"], 100)))
                rows.append((name, " · ".join(bits)))
            continue
        if isinstance(info, dict):
            desc = "; ".join(f"{esc(str(k))}: {esc(_short(v))}" for k, v in list(info.items())[:6])
        else:
            desc = esc(_short(info))
        rows.append((str(key), desc))
    return rows


def _models_section(peer) -> str:
    rows = [f"<tr><td><b>{esc(name)}</b></td><td>{desc}</td></tr>" for name, desc in _models(peer)]
    return _section("models", "Models served", len(rows),
                    _table(["name", "details"], rows, "this peer serves no models"))


def _short(v, n: int = 80) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"


def render_status(peer) -> str:
    """The public page: facts this peer already announces to the network."""
    summaries = list(peer._summaries.values())
    rows = [f"<tr><td><code>{esc(s.id)}</code></td><td>{_tags(s.tags)}</td>"
            f"<td>{esc(str(tuple(s.shape)))} {esc(s.dtype)}</td><td>{esc(s.description)}</td></tr>"
            for s in summaries]
    body = (_cards([("peers known", len(peer.directory.peers())), ("datasets", len(summaries)),
                    ("models served", len(_models(peer)))])
            + _section("datasets", "Published data", len(rows),
                       _table(["id", "tags", "shape", "description"], rows, "nothing published"))
            + _models_section(peer) + _peers_section(peer))
    return _page(f"{peer.name} · p2pgrid", _header(peer, owner=False), body)


# ------------------------------------------------------------------ owner view

def _login_section(flash: str = "") -> str:
    return _section("owner-login", "Owner login", None,
                    f'{flash}<form class="inline" method="post" action="/login">'
                    f'<input type="password" name="token" id="token" placeholder="console token" '
                    f'autocomplete="current-password" required>'
                    f'<button class="primary" id="login">Log in</button></form>'
                    f'<p class="muted">The token is in the peer\'s data directory '
                    f'(<code>console-token</code>) and printed when the peer starts; '
                    f'<code>p2pgrid web url</code> shows the login link.</p>')


def _requests_section(gov, csrf: str, flash: str = "") -> str:
    pending = gov.store.requests("pending")
    rows = []
    for r in pending:
        what = "download (get)" if r["epsilon"] is None else f"privacy budget ε = {r['epsilon']:g}"
        rid = esc(r["id"])
        rows.append(
            f'<tr id="req-{rid}"><td><code>{rid}</code></td><td><b>{esc(r["user"])}</b></td>'
            f'<td><code>{esc(r["object_id"])}</code></td><td>{esc(what)}</td>'
            f'<td>{esc(r["reason"])}</td><td class="muted">{_fmt_time(r["created"])}</td>'
            f'<td><form class="inline" method="post" action="/requests/{quote(r["id"])}">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
            f'<input type="text" name="why" placeholder="why (optional)" maxlength="2000">'
            f'<button class="approve" name="decision" value="approve" id="approve-{rid}">Approve</button>'
            f'<button class="deny" name="decision" value="deny" id="deny-{rid}">Deny</button>'
            f'</form></td></tr>')
    recent = [r for r in gov.store.requests(None, limit=10) if r["status"] != "pending"]
    done = [f'<tr><td><code>{esc(r["id"])}</code></td><td>{esc(r["user"])}</td>'
            f'<td><code>{esc(r["object_id"])}</code></td>'
            f'<td class="status-{esc(r["status"])}">{esc(r["status"])}</td><td>{esc(r["why"])}</td>'
            f'<td class="muted">{_fmt_time(r["decided"])}</td></tr>' for r in recent]
    inner = flash + _table(["id", "user", "object", "asks for", "reason", "filed", "decision"],
                           rows, "no pending requests")
    if done:
        inner += ('<h3 class="muted" style="font-size:.9rem;margin:1rem 0 .3rem">Recent decisions</h3>'
                  + _table(["id", "user", "object", "status", "why", "when"], done, ""))
    return _section("requests", "Pending requests", len(pending), inner)


def _bar(spent: float, limit: float | None) -> str:
    if limit is None:
        return f'<span class="muted">{spent:.4g} spent, no dataset cap</span>'
    frac = 1.0 if limit <= 0 else min(spent / limit, 1.0)
    full = " full" if frac >= 1.0 else ""
    return (f'{spent:.4g} / {limit:.4g}<div class="bar"><i class="{full.strip()}" '
            f'style="width:{frac * 100:.0f}%"></i></div>')


def _datasets_section(metas, gov) -> str:
    dp = gov.store.datasets()
    rows = []
    for m in metas:
        r = m.rules
        rules = (f"compute: {_names(r.compute)}<br>get: {_names(r.get)}<br>"
                 f"aggregate: {_names(r.aggregate)} (≥ {r.min_rows} rows)")
        d = dp.get(m.id)
        if d:
            bounds = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in d["bounds"])
            budget = f'{_bar(d["spent"], d["epsilon"])}<div class="muted">bounds {esc(bounds)}</div>'
        else:
            budget = '<span class="muted">no private queries (no bounds declared)</span>'
        rows.append(f"<tr><td><code>{esc(m.id)}</code><div>{_tags(m.tags)}</div></td>"
                    f"<td>{esc(str(tuple(m.shape)))} {esc(m.dtype)}</td><td>{esc(m.description)}</td>"
                    f"<td>{rules}</td><td>{budget}</td></tr>")
    return _section("datasets", "Datasets", len(rows),
                    _table(["id · tags", "shape", "description", "access rules", "privacy budget (ε)"],
                           rows, "nothing stored"))


def _users_section(gov) -> str:
    from .governance.roles import format_key
    from .governance.store import DEFAULT_EPSILON

    store = gov.store
    caps = {(b["user"], b["object_id"]): b["epsilon"] for b in store.budgets()}
    default = store.setting("default_epsilon", DEFAULT_EPSILON)
    rows = []
    for u in sorted(store.users().values(), key=lambda u: (u.role, u.name)):
        limit = caps.get((u.name, None), default)
        key = (f"<code>{esc(format_key(u.public_key)[:16])}…</code>" if u.public_key
               else '<span class="muted">bound on first use</span>')
        rows.append(f"<tr><td><b>{esc(u.name)}</b></td><td>{esc(u.role)}</td><td>{key}</td>"
                    f"<td>{_bar(store.spent(u.name), limit)}</td></tr>")
    mode = ("registered users only" if store.registered_only
            else "open; releases to registered users only" if store.releases_registered_only
            else "open: unregistered callers follow object rules")
    guests = store.setting("guest_epsilon")
    return _section("users", "Users", len(rows),
                    f'<p class="muted">Mode: <b>{esc(mode)}</b>. Default budget for users without '
                    f'one: ε = {default:g}. Unregistered callers together: '
                    f'ε = {store.pooled_spent():.4g} spent of '
                    f'{default if guests is None else guests:g}.</p>'
                    + _table(["name", "role", "key", "budget used (ε)"], rows,
                             "no registered users (open mode)"))


def _audit_section(gov) -> str:
    entries = gov.store.audit_tail(25)
    verdict = gov.store.verify(gov.peer.identity.public_bytes, incremental=True)
    status = (f'<span class="pill on" id="chain">chain intact</span> <span class="muted">'
              f'{verdict.entries} entries · head <code>{esc(verdict.head[:16])}</code></span>'
              if verdict.ok else f'<span class="pill bad" id="chain">chain broken</span> '
              f'{esc("; ".join(verdict.problems[:3]))}')
    rows = []
    for e in reversed(entries):
        extra = {k: v for k, v in e.items() if k not in ("seq", "time", "action", "caller", "peer",
                                                          "hash")}
        rows.append(f'<tr><td>{esc(str(e.get("seq", "")))}</td><td class="muted">'
                    f'{_fmt_time(e.get("time"))}</td><td><b>{esc(str(e.get("action", "")))}</b></td>'
                    f'<td>{esc(str(e.get("caller") or ""))}</td>'
                    f'<td><code>{esc(_short(extra, 140))}</code></td></tr>')
    return _section("audit", "Audit trail", None, f"<p>{status}</p>" + '<div class="audit">'
                    + _table(["#", "time", "action", "who", "details"], rows, "nothing logged yet")
                    + "</div>")


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
            for metric in ("loss", "eval_loss", "accuracy", "epsilon"):
                v = d.get(metric)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    series.setdefault(metric, []).append((float(rnd), float(v)))
        if series:
            out.append((str(name or key), series))
    return out


def _chart(title: str, points: list[tuple[float, float]], colour: str) -> str:
    w, h, pad = 300, 130, 28
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y):
        return h - pad + (y0 - y) / (y1 - y0) * (h - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>'
                   for x, y in points)
    return (f'<div class="chart"><h3>{esc(title)}</h3><svg width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{esc(title)}">'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#ccd"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#ccd"/>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>{dots}'
            f'<text x="2" y="{pad + 4}" font-size="10" fill="#667">{y1:.3g}</text>'
            f'<text x="2" y="{h - pad}" font-size="10" fill="#667">{y0:.3g}</text>'
            f'<text x="{pad}" y="{h - 8}" font-size="10" fill="#667">round {x0:g}</text>'
            f'<text x="{w - pad - 40}" y="{h - 8}" font-size="10" fill="#667">{x1:g}</text>'
            f'</svg></div>')


_COLOURS = {"loss": "#3b5bdb", "eval_loss": "#ae3ec9", "accuracy": "#2b8a3e", "epsilon": "#e67700"}


def _training_section(peer) -> str:
    try:
        runs = training_runs(peer.extensions.get("federated"))
    except Exception:  # another plugin's state: never let it break the page
        log.exception("reading federated runs")
        runs = []
    if not runs:
        return _section("training", "Training runs", 0,
                        '<p class="empty">no federated runs coordinated by this peer</p>')
    inner = "".join(
        f'<h3 style="font-size:.95rem">{esc(name)}</h3><div class="charts">'
        + "".join(_chart(metric.replace("_", " "), pts, _COLOURS.get(metric, "#495057"))
                  for metric, pts in series.items()) + "</div>" for name, series in runs)
    return _section("training", "Training runs", len(runs), inner)


def render_owner(peer, gov, metas, csrf: str, flash: str = "") -> str:
    pending = len(gov.store.requests("pending"))
    body = (_cards([("peers known", len(peer.directory.peers())),
                            ("datasets", len(metas)), ("models served", len(_models(peer))),
                            ("pending requests", pending), ("users", len(gov.store.users()))])
            + _requests_section(gov, csrf, flash) + _datasets_section(metas, gov) + _users_section(gov)
            + _models_section(peer) + _training_section(peer) + _peers_section(peer)
            + _audit_section(gov))
    return _page(f"{peer.name} · p2pgrid console", _header(peer, owner=True, csrf=csrf), body)


# ------------------------------------------------------------------ the console app

@dataclass
class Session:
    csrf: str
    created: float
    flash: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Response:
    status: int
    body: bytes = b""
    ctype: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


class Console:
    """The ASGI app of the console listener (see module docstring)."""

    def __init__(self, peer, gov, *, secure: bool = False):
        self.peer, self.gov, self.secure = peer, gov, secure
        self.sessions: dict[str, Session] = {}
        self.cookie = f"p2pgrid_{peer.key_id}"  # cookies ignore ports: one name per peer
        self._failures: deque[float] = deque()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await handle_lifespan(receive, send)
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body, too_big = b"", False
        if scope["method"] == "POST":
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                size += len(msg.get("body", b""))
                if size > MAX_FORM:
                    too_big = True
                else:
                    chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
        try:
            if too_big:
                resp = Response(413, b"form too large\n", "text/plain")
            else:
                resp = await self.handle(scope["method"], scope["path"],
                                         scope.get("query_string", b"").decode("latin-1"),
                                         headers, body)
        except Exception:
            log.exception("console request failed")
            resp = Response(500, b"internal error; see the peer's log\n", "text/plain")
        out = [(b"content-type", resp.ctype.encode()), (b"content-length", str(len(resp.body)).encode()),
               (b"content-security-policy", _CSP.encode()), (b"x-frame-options", b"DENY"),
               (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin"),
               (b"cache-control", b"no-store")]
        out += [(k.encode(), v.encode()) for k, v in resp.headers]
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await send({"type": "http.response.body", "body": resp.body})

    # ------------------------------------------------------------ routing

    async def handle(self, method: str, path: str, query: str, headers: dict,
                     body: bytes) -> Response:
        session = self._session(headers)
        if path == "/health" and method == "GET":
            return Response(200, b"ok\n", "text/plain")
        if path == "/" and method == "GET":
            return await self._home(session)
        if path == "/login" and method == "GET":
            token = parse_qs(query).get("token", [""])[0]
            if not token:
                return self._html(render_login(self.peer))
            return self._login(token, headers)
        if method == "POST":
            if not self._same_origin(headers):
                return Response(403, b"cross-site request refused\n", "text/plain")
            form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
            if path == "/login":
                return self._login(form.get("token", ""), headers)
            if session is None:
                return self._redirect("/")  # session gone (expired, peer restarted): log in again
            if not hmac.compare_digest(form.get("csrf", ""), session.csrf):
                return Response(403, b"missing or wrong CSRF token; reload the page\n", "text/plain")
            if path == "/logout":
                self.sessions = {k: s for k, s in self.sessions.items() if s is not session}
                return self._redirect("/", clear=True)
            if path.startswith("/requests/"):
                return await self._decide(session, path.removeprefix("/requests/"), form)
        if method not in ("GET", "POST"):
            return Response(405, b"method not allowed\n", "text/plain")
        return Response(404, _page("not found", _header(self.peer, owner=False),
                                   '<section><h2>Not found</h2><p><a href="/">Back to the '
                                   'peer\'s page</a></p></section>').encode())

    def _session(self, headers: dict) -> Session | None:
        now = time.time()
        self.sessions = {k: s for k, s in self.sessions.items() if now - s.created < SESSION_TTL}
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie:
                for sid, s in self.sessions.items():
                    if hmac.compare_digest(sid, value):
                        return s
        return None

    def _same_origin(self, headers: dict) -> bool:
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = headers.get("origin")
        if origin is None:
            return True  # not a browser's cross-site form (those carry an origin); CSRF token decides
        if origin == "null":
            return site == "same-origin"
        host = headers.get("host") or headers.get(":authority") or ""
        return origin.split("://", 1)[-1] == host

    def _html(self, text: str, status: int = 200) -> Response:
        return Response(status, text.encode())

    def _redirect(self, to: str, *, cookie: str | None = None, clear: bool = False) -> Response:
        headers = [("location", to)]
        attrs = "; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if self.secure else "")
        if cookie is not None:
            headers.append(("set-cookie", f"{self.cookie}={cookie}{attrs}; Max-Age={int(SESSION_TTL)}"))
        if clear:
            headers.append(("set-cookie", f"{self.cookie}={attrs}; Max-Age=0"))
        return Response(303, b"", "text/plain", headers)

    def _login(self, token: str, headers: dict) -> Response:
        now = time.time()
        while self._failures and now - self._failures[0] > 60:
            self._failures.popleft()
        if len(self._failures) >= LOGIN_FAILURES:
            return Response(429, b"too many failed logins; wait a minute\n", "text/plain")
        if not token or not hmac.compare_digest(token.encode(), self.gov.token.encode()):
            self._failures.append(now)
            self.peer.audit("console.login_failed", None)
            return self._html(render_login(self.peer, "wrong token"), 403)
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(secrets.token_urlsafe(32), now)
        self.peer.audit("console.login", "owner")
        return self._redirect("/", cookie=sid)

    async def _home(self, session: Session | None) -> Response:
        if session is None:
            return self._html(render_status(self.peer).replace(
                "</main>", _login_section() + "</main>", 1))
        metas = await trio.to_thread.run_sync(self._objects)
        flash = "".join(f'<div class="flash{" err" if kind == "err" else ""}" id="flash">'
                        f'{esc(text)}</div>' for kind, text in session.flash)
        session.flash.clear()
        text = await trio.to_thread.run_sync(
            lambda: render_owner(self.peer, self.gov, metas, session.csrf, flash))
        return self._html(text)

    def _objects(self):
        return [m for m in self.peer.store.list() if m.expires is None]

    async def _decide(self, session: Session, rid: str, form: dict) -> Response:
        from .errors import P2PError

        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            return Response(400, b"decision must be approve or deny\n", "text/plain")
        try:
            req = await trio.to_thread.run_sync(lambda: self.gov.store.decide(
                rid, approve=decision == "approve", why=form.get("why", "").strip(),
                by=f"{self.peer.name} (console)"))
        except P2PError as e:
            session.flash.append(("err", e.message))
        else:
            self.gov.notify()
            session.flash.append(("ok", f"Request {req['id']} of {req['user']} {req['status']}."))
        return self._redirect("/#requests")


def render_login(peer, error: str = "") -> str:
    flash = f'<div class="flash err" id="flash">{esc(error)}</div>' if error else ""
    return _page(f"{peer.name} · log in", _header(peer, owner=False), _login_section(flash))


async def public_page(peer, scope, body) -> tuple[int, str, bytes]:
    """``peer.page``: the public page on the peer's own port (GET only)."""
    if scope.get("method") != "GET":
        return 405, "text/plain", b"method not allowed\n"
    if scope.get("path") not in ("/", ""):
        return 404, "text/plain", b"not found\n"
    return 200, "text/html; charset=utf-8", render_status(peer).encode()


# ------------------------------------------------------------------ the listener

def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def console_certificate(directory: Path, host: str) -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate for the console (browsers take no Ed25519)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = directory / "console-cert.pem", directory / "console-key.pem"
    if certfile.exists() and keyfile.exists():
        return str(certfile), str(keyfile)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        san = [x509.DNSName(host)]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pgrid console {host}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(key, hashes.SHA256()))
    keyfile.touch(mode=0o600)
    keyfile.chmod(0o600)
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(certfile), str(keyfile)


async def serve_console(peer, gov, *, host: str = "127.0.0.1", port: int = 0,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the console until cancelled; reports its base URL. Plain HTTP on loopback,
    TLS (ECDSA, self-signed) anywhere else. Port 0: the last run's port, else any."""
    from .server import serve

    data = Path(peer.config.data_dir)
    secure = not _is_loopback(host)
    certfile = keyfile = None
    if secure:
        certfile, keyfile = console_certificate(data / "console-tls", host)
    app = Console(peer, gov, secure=secure)
    saved = data / "console-port"
    candidates = [port] if port else []
    if not port:
        try:
            candidates.append(int(saved.read_text()))
        except (OSError, ValueError):
            pass
        candidates.append(0)

    async def run(p, task_status):
        await serve(app, host=host, port=p, certfile=certfile, keyfile=keyfile, task_status=task_status)

    async with trio.open_nursery() as nursery:
        for i, p in enumerate(candidates):
            try:
                binds = await nursery.start(run, p)
                break
            except OSError:
                if i == len(candidates) - 1:
                    raise
        bound = int(str(binds[0]).rsplit(":", 1)[1])
        saved.write_text(f"{bound}\n")
        shown = host if ":" not in host else f"[{host}]"
        url = f"{'https' if secure else 'http'}://{shown}:{bound}"
        peer.page = public_page
        task_status.started(url)
