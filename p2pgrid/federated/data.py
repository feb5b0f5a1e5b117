"""How training data is published and found: the x/y convention.

A data owner publishes each data set as two objects carrying the same tags plus a
role tag: the features with ``#x`` and the labels with ``#y`` (same first dimension)::

    await net.federated_publish(images, labels, tags=["mnist", "train"], compute=["ai-company"])
    # == publish(images, tags=["mnist", "train", "x"], ...) and publish(labels, tags=[..., "y"], ...)

A query such as ``"#mnist #train"`` matches every peer holding such a pair; objects
whose tags differ only by the role form a pair, and a peer with several pairs trains
on all of them. Nothing here reads values: the coordinator sees only the
directory's summaries (ids, tags, shapes).

>>> from p2pgrid.directory import ObjectSummary
>>> objs = [ObjectSummary("a", ["mnist", "train", "x"], "", [10, 784], "float32", "h"),
...         ObjectSummary("b", ["mnist", "train", "y"], "", [10], "int64", "h"),
...         ObjectSummary("c", ["mnist", "train", "x", "v2"], "", [5, 784], "float32", "h")]
>>> pairs_of(objs, "#mnist #train")
[['a', 'b']]
"""

from __future__ import annotations

from collections.abc import Iterable

from ..directory import normalize_tags

__all__ = ["ROLE_X", "ROLE_Y", "query_tags", "pairs_of", "find_shards", "rows_of"]

ROLE_X, ROLE_Y = "x", "y"


def query_tags(query: str | Iterable[str]) -> frozenset[str]:
    """The tags of a data query, without the role tags (they are added per object)."""
    return frozenset(normalize_tags(query)) - {ROLE_X, ROLE_Y}


def pairs_of(objects, query: str | Iterable[str]) -> list[list[str]]:
    """[x id, y id] pairs among one peer's object summaries that match `query`."""
    want = query_tags(query)
    groups: dict[frozenset[str], dict[str, str]] = {}
    for o in objects:
        tags = frozenset(normalize_tags(o.tags))
        if not want <= tags:
            continue
        role = ROLE_X if ROLE_X in tags else ROLE_Y if ROLE_Y in tags else None
        if role is None or {ROLE_X, ROLE_Y} <= tags:
            continue
        groups.setdefault(tags - {role}, {})[role] = o.id
    return sorted([g[ROLE_X], g[ROLE_Y]] for g in groups.values() if len(g) == 2)


def rows_of(objects, pairs: list[list[str]]) -> int:
    """Examples in `pairs` according to the summaries' shapes (0 if unknown)."""
    shapes = {o.id: o.shape for o in objects}
    return sum(int(shapes[x][0]) if shapes.get(x) else 0 for x, _ in pairs)


def find_shards(directory, query: str | Iterable[str]) -> dict[str, list[list[str]]]:
    """{peer label: its [x id, y id] pairs} for every live peer holding data for `query`."""
    if not query_tags(query):
        raise ValueError("a data query needs at least one tag besides #x/#y")
    out = {}
    for rec in directory.peers():
        pairs = pairs_of(rec.objects, query)
        if pairs:
            out[directory.label(rec)] = pairs
    return out
