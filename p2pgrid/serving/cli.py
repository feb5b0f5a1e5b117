"""``p2pgrid models``: what the network serves, where, and under which terms."""

from __future__ import annotations

import json

import trio


def add_cli(subparsers) -> dict:
    from ..cli import add_network_options

    p = subparsers.add_parser(
        "models", help="list the models the network serves",
        description="Join the network briefly and list the served models: owner, hosts "
                    "(owner and replicas), flags (inference, download) and input policy.")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_network_options(p)
    return {"models": run_models}


async def run_models(args) -> int:
    from ..cli import _ephemeral

    async with await _ephemeral(args) as net:
        await trio.sleep(min(args.wait, 1.0))
        infos = net.models()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2, default=str))
        return 0
    if not infos:
        print("no served models found")
        return 0
    print(format_table(infos))
    return 0


def format_table(infos) -> str:
    from .policy import Policy

    rows = [f"{'MODEL':<20} {'OWNER':<12} {'SIZE':>9} {'HASH':<12} {'FLAGS':<19} HOSTS"]
    for i in infos:
        size = f"{i.size / 1e6:.1f}MB" if i.size >= 1e5 else f"{i.size / 1e3:.1f}kB"
        hosts = ",".join(sorted(i.hosts.values(), key=lambda h: (h != i.owner, h)))
        rows.append(f"{i.name:<20} {i.owner:<12} {size:>9} {i.hash[:12]:<12} "
                    f"{','.join(i.flags()) or '-':<19} {hosts or '(none up)'}")
        try:
            summary = Policy.from_dict(i.policy).summary()
        except Exception:
            summary = "(unreadable policy)"
        rows.append(f"{'':<20} policy: {summary}")
        if i.terms.get("description"):
            rows.append(f"{'':<20} {i.terms['description']}")
    return "\n".join(rows)
