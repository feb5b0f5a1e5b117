"""The peer's page: who it is, whom it knows, what it holds. Public facts only."""

from __future__ import annotations

import html
import time


def _fmt_age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60}m {s % 60}s" if s >= 3600 else f"{s // 60}m {s % 60}s"


def render_status(peer) -> str:
    esc = html.escape
    rows_peers = "".join(
        f"<tr><td>{esc(peer.directory.label(r))}</td><td><code>{esc(r.key_id)}</code></td>"
        f"<td>{esc(', '.join(r.addresses))}</td><td>{esc(', '.join(r.roles))}</td>"
        f"<td>{len(r.objects)}</td></tr>" for r in peer.directory.peers())
    rows_objs = "".join(
        f"<tr><td><code>{esc(s.id)}</code></td><td>{esc(' '.join('#' + t for t in s.tags))}</td>"
        f"<td>{esc(str(tuple(s.shape)))} {esc(s.dtype)}</td><td>{esc(s.description)}</td></tr>"
        for s in peer._summaries.values())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(peer.name)} · p2pgrid</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}}table{{border-collapse:collapse;margin-bottom:2rem}}
td,th{{border-bottom:1px solid #ddd;padding:.3rem .8rem;text-align:left}}th{{background:#f4f4f8}}code{{color:#555}}</style>
</head><body><h1>{esc(peer.name)}</h1>
<p>key <code>{esc(peer.key_id)}</code> · {esc(peer.address or '')} · up {_fmt_age(time.time() - peer.started_at)}</p>
<h2>Peers ({len(peer.directory.peers())})</h2>
<table><tr><th>name</th><th>key</th><th>addresses</th><th>roles</th><th>objects</th></tr>{rows_peers}</table>
<h2>Published data ({len(peer._summaries)})</h2>
<table><tr><th>id</th><th>tags</th><th>shape</th><th>description</th></tr>{rows_objs}</table>
</body></html>"""
