"""The op whitelist, the evaluator, and its record-level guard, without any network."""

import pytest
import torch

from p2pgrid.errors import BadRequest, ShapeError, UnknownOp
from p2pgrid.ops import Level, evaluate


class Builder:
    """Builds programs the way pointer.py does, by hand, for precise tests."""

    def __init__(self):
        self.nodes = []

    def leaf(self, obj):
        self.nodes.append({"op": "leaf", "obj": obj})
        return {"$": len(self.nodes) - 1}

    def op(self, name, *args, **kwargs):
        self.nodes.append({"op": name, "args": list(args), "kwargs": kwargs})
        return {"$": len(self.nodes) - 1}

    def program(self):
        return {"nodes": self.nodes}


X = torch.arange(60, dtype=torch.float32).reshape(20, 3)


def run(b, data=None, min_rows=10):
    data = data if data is not None else {"x": X}
    return evaluate(b.program(), lambda oid: (data[oid], Level("row", 0, data[oid].shape[0])),
                    min_rows=min_rows)


def test_values_match_torch():
    b = Builder()
    x = b.leaf("x")
    col = b.op("getitem", x, {"tuple": [{"slice": [None, None, None]}, 0]})
    b.op("div", b.op("sum", col), 20)
    value, level = run(b)
    assert torch.allclose(value, X[:, 0].sum() / 20) and level.kind == "aggregate"


@pytest.mark.parametrize("build, kind", [
    (lambda b, x: b.op("mean", x, dim=0), "aggregate"),
    (lambda b, x: b.op("var", b.op("mul", x, 2.0), dim=0), "aggregate"),
    (lambda b, x: b.op("sum", b.op("mul", x, {"tensor": torch.tensor([1.0, 2.0, 3.0])}), dim=0), "aggregate"),
    (lambda b, x: b.op("histc", b.op("getitem", x, {"tuple": [{"slice": [None, None, None]}, 1]}), bins=4, min=0.0, max=60.0), "aggregate"),
    (lambda b, x: b.op("matmul", b.op("t", x), x), "aggregate"),            # X^T X
    (lambda b, x: b.op("mean", b.op("matmul", x, {"tensor": torch.ones(3, 2)}), dim=0), "aggregate"),
    (lambda b, x: b.op("mul", x, 2), "row"),                               # raw rows
    (lambda b, x: b.op("sum", x, dim=1), "row"),                           # per-record sums
    (lambda b, x: b.op("amax", x), "row"),                                 # one record's value
    (lambda b, x: b.op("sum", b.op("mul", x, {"tensor": torch.eye(20)[0].reshape(20, 1)})), "row"),  # one-hot mask
    (lambda b, x: b.op("sum", b.op("getitem", x, {"slice": [0, 5, None]})), "row"),  # too few records
    (lambda b, x: b.op("sum", b.op("getitem", x, {"tensor": torch.tensor([3] * 15)}), dim=0), "row"),  # repeats one
    (lambda b, x: b.op("sum", b.op("getitem", x, 4)), "row"),               # a single record
    (lambda b, x: b.op("sum", b.op("t", x), dim=0), "row"),                 # transposed: per-record sums
    (lambda b, x: b.op("matmul", {"tensor": torch.eye(20)[:1]}, x), "row"), # weighted pick of one row
    (lambda b, x: b.op("sum", b.op("reshape", x, {"tuple": [3, 20]}), dim=0), "row"),
    (lambda b, x: b.op("mean", b.op("cat", {"tuple": [x, x]}, dim=0), dim=0), "row"),
])
def test_record_level_guard(build, kind):
    b = Builder()
    build(b, b.leaf("x"))
    assert run(b)[1].kind == kind


def test_min_rows_threshold():
    b = Builder()
    b.op("sum", b.op("getitem", b.leaf("x"), {"slice": [0, 12, None]}), dim=0)
    assert run(b, min_rows=12)[1].kind == "aggregate"
    assert run(b, min_rows=13)[1].kind == "row"


def test_bool_mask_selection_keeps_uniformity():
    b = Builder()
    x = b.leaf("x")
    col = b.op("getitem", x, {"tuple": [{"slice": [None, None, None]}, 0]})
    mask = b.op("gt", col, 10.0)
    b.op("mean", b.op("getitem", x, mask), dim=0)
    value, level = run(b)
    assert level.kind == "aggregate" and torch.allclose(value, X[X[:, 0] > 10].mean(0))


def test_unknown_op_names_it():
    b = Builder()
    b.op("__import__", b.leaf("x"))
    with pytest.raises(UnknownOp, match="__import__"):
        run(b)


def test_shape_errors_are_typed():
    b = Builder()
    x = b.leaf("x")
    b.op("matmul", x, x)
    with pytest.raises(ShapeError, match="matmul"):
        run(b)


@pytest.mark.parametrize("program, match", [
    ({}, "non-empty list"),
    ({"nodes": []}, "non-empty list"),
    ({"nodes": [{"op": "sum", "args": [{"$": 5}], "kwargs": {}}]}, "earlier node"),
    ({"nodes": [{"op": "leaf", "obj": "x"}, {"op": "sum", "args": [{"$": 0}], "kwargs": {"out": 1}}]}, "no keyword"),
    ({"nodes": [{"op": "leaf", "obj": "x"}, {"op": "add", "args": [{"$": 0}, {"weird": 1}]}]}, "unrecognised"),
    ({"nodes": [{"op": "leaf"}]}, "object id"),
    ({"nodes": [{"op": "leaf", "obj": "x"}] * 600}, "limit"),
])
def test_malformed_programs(program, match):
    with pytest.raises(BadRequest, match=match):
        evaluate(program, lambda oid: (X, Level("row", 0, 20)))


def test_output_size_is_bounded_before_work():
    b = Builder()
    x = b.leaf("x")
    b.op("matmul", b.op("reshape", x, {"tuple": [60, 1]}), b.op("reshape", x, {"tuple": [1, 60]}))
    with pytest.raises(BadRequest, match="limit"):
        evaluate(b.program(), lambda oid: (X, Level("row", 0, 20)), max_elements=1000)


def test_meta_dry_run_matches_real_shapes():
    b = Builder()
    x = b.leaf("x")
    b.op("mean", b.op("matmul", x, {"tensor": torch.ones(3, 4)}), dim=0)
    meta, _ = evaluate(b.program(), lambda oid: (torch.empty(20, 3, device="meta"), Level("row", 0, 20)),
                       device="meta")
    real, _ = run(b)
    assert meta.shape == real.shape == (4,)
