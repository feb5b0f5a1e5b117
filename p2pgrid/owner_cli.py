"""The owner's data commands: ``p2pgrid publish FILE`` and ``p2pgrid data list|show|rules|unpublish``.

They talk to the running peer as its owner (see :mod:`p2pgrid.owner`), so changes
take effect at once and land in its audit trail.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RULE_OPTIONS = ("--compute", "--get", "--aggregate")

EPILOG_PUBLISH = """examples:
  p2pgrid publish births.csv --peer hospital --tags '#birth-records #2024' \\
      --description "Births, Feb 2024" --compute bob,ana --get ana --aggregate bob,ana --min-rows 10
  p2pgrid publish scans.npy --peer hospital --tags '#scans' --compute bob
"""
EPILOG_DATA = """examples:
  p2pgrid data list --peer hospital
  p2pgrid data show births-2024-02 --peer hospital
  p2pgrid data rules births-2024-02 --compute +carol --get -ana --peer hospital
  p2pgrid data unpublish births-2024-02 --peer hospital
"""


def fix_argv(argv: list[str]) -> list[str]:
    """Let ``--get -ana`` mean ``--get=-ana`` (argparse would take -ana for an option)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in RULE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and argv[i + 1] not in ("-", "--") and not argv[i + 1].startswith("--"):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [n.strip() for n in value.split(",") if n.strip()]


def _target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which peer")
    g.add_argument("--peer", metavar="NAME", help="the running peer's name: its data is "
                   "$P2PGRID_HOME/NAME (default: the only peer there)")
    g.add_argument("--data-dir", type=Path, help="the running peer's data directory")


def _rule_options(p: argparse.ArgumentParser, editing: bool) -> None:
    how = ("NAMES sets the list; +NAME adds, -NAME removes (comma-separated)" if editing
           else "comma-separated names; * for anyone")
    p.add_argument("--compute", metavar="NAMES", help=f"who may run programs on it ({how})")
    p.add_argument("--get", metavar="NAMES", help=f"who may download it, rows included ({how})")
    p.add_argument("--aggregate", metavar="NAMES",
                   help=f"who may download exact aggregates over --min-rows records ({how})")
    p.add_argument("--min-rows", type=int, help="records an exact aggregate must span "
                   "(default: the peer's, 10)")


def add_cli(sub) -> dict:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("publish", help="publish a CSV, Parquet, .npy or .safetensors file on "
                       "your running peer (owner)", formatter_class=fmt, epilog=EPILOG_PUBLISH,
                       description="Read FILE here (pyarrow for CSV with a header and Parquet; "
                                   "numpy without pickle for .npy; safetensors) and publish it on "
                                   "the running peer. A table's numeric columns become the "
                                   "tensor's columns and their names travel with it: scientists "
                                   "write rec['weight_kg'] and find it by '#weight_kg'.")
    p.add_argument("file", type=Path, help="the data file (.csv, .parquet, .npy, .safetensors)")
    p.add_argument("--id", help="the object's id (default: the file's name without suffix)")
    p.add_argument("--tags", default="", help="tags to find it by, e.g. '#birth-records #2024'")
    p.add_argument("--description", default="", help="one line shown in search results")
    _rule_options(p, editing=False)
    p.add_argument("--bounds", nargs="+", metavar="LO:HI",
                   help="column bounds for DP releases (one, or one per column)")
    p.add_argument("--epsilon", type=float, help="the dataset's total privacy budget")
    p.add_argument("--tensor", help="which tensor of a .safetensors file (if it holds several)")
    _target(p)

    d = sub.add_parser("data", help="list, show, change the rules of, or unpublish your data "
                       "(owner)", formatter_class=fmt, epilog=EPILOG_DATA,
                       description="The data your running peer publishes. Rule changes take "
                                   "effect at once and are audited.")
    ds = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    dl = ds.add_parser("list", help="the objects your peer publishes")
    dl.add_argument("--json", action="store_true", help="print JSON")
    _target(dl)
    dsh = ds.add_parser("show", help="one object: shape, columns, rules")
    dsh.add_argument("id", help="the object's id")
    dsh.add_argument("--json", action="store_true", help="print JSON")
    _target(dsh)
    dr = ds.add_parser("rules", help="change who may compute, get, aggregate")
    dr.add_argument("id", help="the object's id")
    _rule_options(dr, editing=True)
    _target(dr)
    du = ds.add_parser("unpublish", help="delete the object from your peer")
    du.add_argument("id", help="the object's id")
    _target(du)
    return {"publish": _run(_publish), "data": _run(_data)}


def _run(fn):
    async def run(args) -> int:
        from .errors import P2PError
        try:
            return await fn(args)
        except P2PError as e:
            print(f"p2pgrid {args.command}: {e.message}", file=sys.stderr)
            return 1
    return run


def _data_dir(args) -> Path:
    from .governance.cli import _data_dir as find
    return find(args)


async def _publish(args) -> int:
    import trio

    from .datasets import load_file
    from .errors import BadRequest
    from .governance.actions import parse_bounds
    from .messages import PublishData
    from .owner import owner_session
    from .store import Rules

    data = _data_dir(args)
    tensor, columns, notes = await trio.to_thread.run_sync(
        lambda: load_file(args.file, tensor_name=args.tensor))
    for note in notes:
        print(f"p2pgrid publish: {args.file.name}: {note}", file=sys.stderr)
    if any(n.startswith(("+", "-")) for v in (args.compute, args.get, args.aggregate)
           for n in _names(v) or ()):
        raise BadRequest("publish takes plain names; +NAME/-NAME change rules with "
                         "`p2pgrid data rules`")
    rules = Rules(compute=tuple(_names(args.compute) or ()), get=tuple(_names(args.get) or ()),
                  aggregate=tuple(_names(args.aggregate) or ()),
                  **({"min_rows": args.min_rows} if args.min_rows is not None else {}))
    rules_dict = rules.to_dict()
    if args.min_rows is None:
        rules_dict.pop("min_rows")  # the peer's default
    bounds = parse_bounds(args.bounds).to_list() if args.bounds else None
    msg = PublishData(tensor, id=args.id or args.file.stem, tags=args.tags.replace(",", " ").split(),
                      description=args.description, columns=columns, rules=rules_dict,
                      bounds=bounds, epsilon=args.epsilon)
    async with owner_session(data) as request:
        reply = await request(msg)
    m = reply.meta
    cols = f" columns {', '.join(m.get('columns') or [])}" if m.get("columns") else ""
    print(f"published {m['id']} {tuple(m['shape'])} {m['dtype']}{cols}")
    return 0


def _show(m: dict) -> None:
    r = m.get("rules", {})
    print(f"{m['id']}  {tuple(m['shape'])} {m['dtype']}  {' '.join('#' + t for t in m['tags'])}")
    if m.get("description"):
        print(f"  {m['description']}")
    if m.get("columns"):
        print(f"  columns: {', '.join(m['columns'])}")
    for right in ("compute", "get", "aggregate"):
        print(f"  {right:<10} {', '.join(r.get(right, [])) or '-'}")
    print(f"  min_rows   {r.get('min_rows')}")


async def _data(args) -> int:
    from .messages import DeleteObject, DescribeObject, ListObjects, SetRules
    from .owner import owner_session

    data = _data_dir(args)
    async with owner_session(data) as request:
        if args.action == "list":
            reply = await request(ListObjects([]))
            mine = [m for m in reply.items if m.get("expires") is None
                    and m.get("owner") == m.get("peer")]
            if args.json:
                print(json.dumps(mine, indent=2))
            elif not mine:
                print("no data published")
            for m in [] if args.json else mine:
                print(f"{m['id']:<28} {str(tuple(m['shape'])):<14} {m['dtype']:<8} "
                      f"{' '.join('#' + t for t in m['tags'])}")
            return 0
        if args.action == "show":
            m = (await request(DescribeObject(args.id))).meta
            if args.json:
                print(json.dumps(m, indent=2))
            else:
                _show(m)
            return 0
        if args.action == "unpublish":
            await request(DeleteObject(args.id))
            print(f"unpublished {args.id}")
            return 0
        edits = {right: _names(getattr(args, right)) for right in ("compute", "get", "aggregate")
                 if getattr(args, right) is not None}
        if not edits and args.min_rows is None:
            print("p2pgrid data rules: give --compute, --get, --aggregate or --min-rows",
                  file=sys.stderr)
            return 2
        m = (await request(SetRules(args.id, edits, args.min_rows))).meta
        _show(m)
        return 0
