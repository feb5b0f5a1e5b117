"""Property tests of the release gate (issue 12): random programs from the whitelisted
ops, mixing uploaded tensors, data-derived masks and keyword operands.

For every program the gate lets an aggregate-only caller download exactly, the output
must depend on the data only as a documented aggregate would, checked without the
gate's own reasoning:

- programs without a matrix product: the output is unchanged when each column's values
  are shuffled across records independently (a sum over records of a fixed function of
  one entry depends on each column's values, not on which values share a record);
- programs with a matrix product: every product is ``A.T @ B`` of plain column
  selections of the dataset (checked syntactically here), and the output is unchanged
  when records are permuted together (no weight or selector per record).
Anything else must be refused (or go through the DP path, which is another handler).
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from p2pgrid.errors import P2PError
from p2pgrid.ops import Level, evaluate
from p2pgrid.release import AGGREGATE, DATA, KNOWN, Leaf, canonical, decide

N, K = 12, 3
TABLE = torch.randint(0, 5, (N, K)).double()  # small integers: masks and ties happen


def _leaves(upload_shape):
    return {"X": Leaf(DATA, (N, K), "float64", 10), "U": Leaf(KNOWN, upload_shape, "float64", 10)}


def _const(draw):
    shape = draw(st.sampled_from([(), (1, K), (K,), (N, 1), (N, K)]))
    if shape == ():
        return float(draw(st.integers(-3, 3)))
    return {"tensor": torch.randint(-2, 3, shape).double()}


def _n(op, *args, **kwargs):
    return {"op": op, "args": list(args), "kwargs": kwargs}


ALL = {"slice": [None, None, None]}


UNARY = ["neg", "abs", "exp", "sign", "floor", "square", "relu", "logical_not"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "eq", "gt", "lt", "logical_and"]
REDUCE = ["sum", "mean", "var", "std", "count_nonzero"]


@st.composite
def programs(draw):
    """Node 0 is an upload U (the caller's, with a one-hot entry), node 1 the dataset X.
    A few elementwise steps on X whose other operand is a constant, U, a mask computed
    from X, or X itself (positional or keyword), then an ending: a reduction, a
    histogram, a product (Gram, with U, with a mask), or none; then post-processing."""
    upload_shape = draw(st.sampled_from([(N, 1), (N, K), (1, K), (K,), (N, N)]))
    nodes = [{"op": "leaf", "obj": "U"}, {"op": "leaf", "obj": "X"}]

    def add(node):
        nodes.append(node)
        return {"$": len(nodes) - 1}

    def other(cur):
        what = draw(st.sampled_from(["const", "upload", "mask", "self", "data"]))
        if what == "const":
            return _const(draw)
        if what == "upload":
            return {"$": 0}
        if what == "mask":
            col = add(_n("getitem", {"$": 1}, {"tuple": [ALL, {"slice": [0, 1, None]}]}))
            return add(_n(draw(st.sampled_from(["gt", "eq"])), col, float(draw(st.integers(0, 4)))))
        return cur if what == "self" else {"$": 1}

    cur = {"$": 1}
    if draw(st.booleans()):
        first = draw(st.sampled_from([ALL, {"slice": [0, 6, None]}, 2, {"tensor": torch.tensor([0, 0, 1])}]))
        col = draw(st.sampled_from([0, {"slice": [0, 2, None]}, ALL]))
        cur = add(_n("getitem", cur, {"tuple": [first, col]}))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "clamp", "where"]))
        if kind == "unary":
            cur = add(_n(draw(st.sampled_from(UNARY)), cur))
        elif kind == "binary":
            a, b = cur, other(cur)
            if draw(st.booleans()):
                a, b = b, a
            cur = add(_n(draw(st.sampled_from(BINARY)), a, b))
        elif kind == "clamp":
            key = draw(st.sampled_from(["min", "max"]))
            if draw(st.booleans()):
                cur = add({"op": "clamp", "args": [cur], "kwargs": {key: other(cur)}})
            else:  # the data hidden in a keyword
                cur = add({"op": "clamp", "args": [other(cur)], "kwargs": {key: cur}})
        else:
            cur = add(_n("where", other(cur), cur, other(cur)))
    ending = draw(st.sampled_from(["reduce", "reduce", "histc", "gram", "product", "none"]))
    if ending == "reduce":
        dim = draw(st.sampled_from([None, 0, 1, {"tuple": [0, 1]}]))
        op = draw(st.sampled_from(REDUCE))
        if dim is not None and draw(st.booleans()):
            cur = add(_n(op, cur, dim))
        else:
            cur = add({"op": op, "args": [cur], "kwargs": {} if dim is None else {"dim": dim}})
    elif ending == "histc":
        cur = add({"op": "histc", "args": [cur], "kwargs": {"bins": draw(st.integers(1, 6)),
                                                            "min": 0.0, "max": 5.0}})
    elif ending == "gram":
        cur = add(_n("matmul", add(_n("t", cur)), draw(st.sampled_from([cur, {"$": 1}]))))
    elif ending == "product":
        a, b = cur, other(cur)
        if draw(st.booleans()):
            a = add(_n("t", a))
        if draw(st.booleans()):
            a, b = b, a
        cur = add(_n("matmul", a, b))
    if draw(st.integers(0, 3)) == 0:  # post-processing
        cur = add(_n(draw(st.sampled_from(["mul", "add", "div"])), cur, other(cur)))
    upload = torch.zeros(upload_shape).double()
    upload.view(-1)[draw(st.integers(0, upload.numel() - 1))] = 1  # a one-hot selector
    return {"nodes": nodes}, upload


def _run(program, table, upload, device="cpu"):
    def resolve(oid):
        t = table if oid == "X" else upload
        return (t.to("meta") if device == "meta" else t), Level("row", 0, t.shape[0] if t.dim() else 0)
    value, _ = evaluate(program, resolve, min_rows=0, device=device)
    return torch.as_tensor(value).double()


def _raw_selection(nodes, i) -> bool:
    """Independent check: node i is leaf X, or X[:, consts] / astype of one."""
    n = nodes[i]
    if n["op"] == "leaf":
        return n["obj"] == "X"
    if n["op"] == "getitem":
        src, idx = n["args"]
        items = idx["tuple"] if isinstance(idx, dict) and "tuple" in idx else [idx]
        return (isinstance(src, dict) and "$" in src and items[0] == {"slice": [None, None, None]}
                and all(isinstance(j, int) or isinstance(j, dict) and "slice" in j for j in items[1:])
                and _raw_selection(nodes, src["$"]))
    if n["op"] == "astype":
        return "$" in n["args"][0] and _raw_selection(nodes, n["args"][0]["$"])
    return False


def _gram_only(nodes) -> bool:
    for n in nodes:
        if n["op"] == "matmul":
            a, b = n["args"]
            if not (isinstance(a, dict) and "$" in a and isinstance(b, dict) and "$" in b):
                return False
            ta = nodes[a["$"]]
            if ta["op"] != "t" or not _raw_selection(nodes, ta["args"][0]["$"]) \
                    or not _raw_selection(nodes, b["$"]):
                return False
    return True


def _same(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)


@settings(max_examples=400, deadline=None)
@given(programs(), st.randoms(use_true_random=False))
def test_every_allowed_release_is_a_documented_aggregate(case, rnd):
    program, upload = case
    try:
        _run(program, TABLE, upload, device="meta")
        out = _run(program, TABLE, upload)
    except P2PError:
        return  # refused by the dry run, or fails on values: nothing to release
    d = decide(canonical(program), _leaves(tuple(upload.shape)), approved=lambda h: False)
    if not d.allowed:
        return
    other = TABLE[torch.randperm(N)] + 1
    if d.kind == KNOWN:  # nothing of the data in it
        assert _same(out, _run(program, other, upload)), program
        return
    assert d.kind == AGGREGATE and d.datasets == {"X"}
    joint = TABLE[torch.tensor(rnd.sample(range(N), N))]
    assert _same(out, _run(program, joint, upload)), ("a per-record weight", program)
    if any(n["op"] == "matmul" for n in program["nodes"]):
        assert _gram_only(program["nodes"]), ("a product that is no Gram matrix", program)
    else:
        cols = torch.stack([TABLE[torch.tensor(rnd.sample(range(N), N)), j] for j in range(K)], 1)
        assert _same(out, _run(program, cols, upload)), ("values of one record linked", program)


def _p(*nodes):  # node 0: the dataset X, node 1: an upload U
    return {"nodes": [{"op": "leaf", "obj": "X"}, {"op": "leaf", "obj": "U"}, *nodes]}




@pytest.mark.parametrize("program, allowed", [
    (_p(_n("sum", {"$": 0}, dim=0)), True),
    (_p(_n("getitem", {"$": 0}, {"tuple": [ALL, 1]}), _n("mean", {"$": 2})), True),
    (_p(_n("gt", {"$": 0}, 2.0), _n("sum", {"$": 2}, dim=0)), True),                 # counts
    (_p(_n("histc", {"$": 0}, bins=5, min=0.0, max=5.0)), True),
    (_p(_n("t", {"$": 0}), _n("matmul", {"$": 2}, {"$": 0})), True),               # Gram
    (_p(_n("var", {"$": 0}, dim=0), _n("add", {"$": 2}, 1.0)), True),               # post
    (_p(_n("mul", {"$": 0}, {"$": 1}), _n("sum", {"$": 2}, dim=0)), False),         # upload
    (_p(_n("gt", {"$": 0}, 2.0), _n("t", {"$": 0}), _n("matmul", {"$": 3}, {"$": 2})), False),
    (_p(_n("clamp", {"tensor": torch.zeros(N, K)}, min={"$": 0})), False),           # keyword
    (_p(_n("sum", {"$": 0}, dim=1)), False),                                          # in-record
    (_p(_n("getitem", {"$": 0}, {"tuple": [{"slice": [0, 11, None]}]}), _n("sum", {"$": 2})), False),
    (_p(_n("mean", {"$": 0}), _n("sub", {"$": 0}, {"$": 2}), _n("sum", {"$": 3})), False),
])
def test_documented_forms(program, allowed):
    d = decide(canonical(program), _leaves((N, 1)), approved=lambda h: False)
    assert d.allowed is allowed, d.why
    if not allowed:
        assert d.why and decide(canonical(program), _leaves((N, 1)),
                                approved=lambda h: h == d.program_hash).basis == "approved"


def test_data_as_an_index_is_row_level():
    program = _p(_n("astype", {"$": 0}, {"dtype": "int64"}),
                 _n("getitem", {"tensor": torch.arange(10.)}, {"$": 2}), _n("sum", {"$": 3}))
    d = decide(canonical(program), _leaves((N, 1)), approved=lambda h: False)
    assert not d.allowed and "argument 1" in d.why
