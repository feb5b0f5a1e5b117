"""One expression layer (p2pgrid.expr) under plaintext pointers and shared tensors.

No network here: building an expression touches none. What runs them is covered by
tests/test_network.py (a peer) and tests/test_smpc_network.py (the parties)."""

import ast
from pathlib import Path

import pytest
import torch

import p2pgrid
from p2pgrid.expr import LazyTensor
from p2pgrid.pointer import Expr, Pointer
from p2pgrid.smpc.api import _leaf
from p2pgrid.smpc.state import Group
from p2pgrid.smpc.tensor import SharedTensor, cat

ROOT = Path(__file__).resolve().parents[1]


class _Net:
    """Stands for a Network: expressions only compare it (and its peer) by identity."""

    def __init__(self):
        self._peer = object()


NET = _Net()
GROUP = Group(("p1", "p2"), "dealer")


def _pointer(peer="h", id_="o1", shape=(20, 3)):
    return Pointer(NET, peer, {"id": id_, "shape": list(shape), "dtype": "float32",
                               "columns": ["x", "y", "z"]})


def _shared(id_="s1", shape=(4, 3), group=GROUP):
    return _leaf(NET, group, id_, shape)


def test_programs_keep_their_wire_forms():
    """Each evaluator gets the programs it always got: leaves, operand order, arg forms."""
    a = _pointer()
    m = a[:, 0].mean()
    assert (m - m * 2 + 1).program() == {"nodes": [
        {"op": "leaf", "obj": "o1"},
        {"op": "getitem", "args": [{"$": 0}, {"tuple": [{"slice": [None, None, None]}, 0]}], "kwargs": {}},
        {"op": "mean", "args": [{"$": 1}], "kwargs": {}},
        {"op": "mul", "args": [{"$": 2}, 2], "kwargs": {}},
        {"op": "sub", "args": [{"$": 2}, {"$": 3}], "kwargs": {}},     # m is one node, used twice
        {"op": "add", "args": [{"$": 4}, 1], "kwargs": {}}]}
    # a reflected commutative op keeps the pointer first; others send the number as a tensor
    assert (2 + a).program()["nodes"][1] == {"op": "add", "args": [{"$": 0}, 2], "kwargs": {}}
    rsub = (2 - a).program()["nodes"][1]
    assert rsub["args"][1] == {"$": 0} and torch.equal(rsub["args"][0]["tensor"], torch.tensor(2))
    assert a.permute(1, 0).program()["nodes"][1]["args"] == [{"$": 0}, 1, 0]
    assert a.flatten().program()["nodes"][1]["kwargs"] == {"start_dim": 0, "end_dim": -1}
    assert a.max(0).program()["nodes"][1] == {"op": "amax", "args": [{"$": 0}],
                                              "kwargs": {"dim": 0, "keepdim": False}}
    assert a["y"].program() == a[:, 1].program()

    x, w = _shared("x", (4, 3)), _shared("w", (3, 2))
    assert (2 + x @ w).relu().program() == {"nodes": [
        {"op": "leaf", "id": "x"}, {"op": "leaf", "id": "w"},
        {"op": "matmul", "args": [{"$": 0}, {"$": 1}], "kwargs": {}},
        {"op": "add", "args": [2.0, {"$": 2}], "kwargs": {}},      # as written, a float
        {"op": "relu", "args": [{"$": 3}], "kwargs": {}}], "outputs": [4]}
    assert (x * 3).program()["nodes"][1]["args"] == [{"$": 0}, 3]  # an integer factor stays exact
    assert x.permute(1, 0).program()["nodes"][1]["args"] == [{"$": 0}, {"tuple": [1, 0]}]
    assert x.flatten().program()["nodes"][1]["args"] == [{"$": 0}, 0, -1]
    assert x.argmax().program()["nodes"][1]["kwargs"] == {"dim": -1, "one_hot": True}
    assert x.T.program()["nodes"][1] == {"op": "transpose", "args": [{"$": 0}, 0, 1], "kwargs": {}}
    both = x.program([x.sum(), cat([x, x], 0)])
    assert both["outputs"] == [1, 2] and len(both["nodes"]) == 3


def test_shape_errors_read_the_same_on_both_evaluators():
    a, x = _pointer(shape=(4, 3)), _shared(shape=(4, 3))
    for build in (lambda v: v @ torch.ones(4, 2), lambda v: v.reshape(5, 2), lambda v: v[7],
                  lambda v: v.transpose(0, 5), lambda v: v.sum(4)):
        with pytest.raises(p2pgrid.ShapeError) as plain:
            build(a)
        with pytest.raises(p2pgrid.ShapeError) as shared:
            build(x)
        assert str(plain.value) == str(shared.value) and ":" in str(plain.value)


def test_a_mask_selection_is_sized_as_the_owner_sizes_it():
    """At its worst case (every row picked), as the owner's dry run does; the flag torch
    needs for that is set only while the expression is checked."""
    import torch.fx.experimental._config as fx_config
    a = _pointer()
    picked = a[a[:, 0] > 0]
    assert picked.shape == (20, 3) and picked[:, 1].sum().shape == ()
    assert fx_config.meta_nonzero_assume_all_nonzero is False
    with pytest.raises(Exception, match="nonzero"):   # the user's own meta tensors: torch's rule
        torch.ones(3, device="meta")[torch.ones(3, device="meta") > 0]


def test_an_op_both_evaluators_have_is_written_once():
    """A method of an op in both whitelists comes from the base class, except where an
    evaluator takes the op's arguments in another form (named here, so a copy is noticed)."""
    smpc_form = {"flatten", "permute", "max", "argmax", "__getitem__"}
    common = set(Expr._OPS) & set(SharedTensor._OPS)
    assert {"add", "matmul", "sum", "mean", "reshape", "relu"} <= common
    for op in sorted(common):
        name = {"div": "__truediv__"}.get(op, f"__{op}__" if hasattr(LazyTensor, f"__{op}__") else op)
        if name in smpc_form or name in Expr._UNARY or name in ("cat", "stack"):  # functions
            continue
        assert name in vars(LazyTensor), op
        assert name not in vars(Expr) and name not in vars(SharedTensor), op
    for op in Expr._UNARY & SharedTensor._UNARY:          # x.relu(), x.square(): one __getattr__
        assert callable(getattr(_pointer(), op)) and callable(getattr(_shared(), op))
    assert "__getattr__" not in vars(Expr) and "__getattr__" not in vars(SharedTensor)


def test_an_op_one_evaluator_lacks_is_refused_plainly():
    x = _shared()
    with pytest.raises(TypeError, match="unsupported operand"):
        x ** 2
    with pytest.raises(p2pgrid.UnknownOp, match="abs is not an operation on a shared tensor"):
        abs(x)
    with pytest.raises(AttributeError, match="'SharedTensor' object has no attribute 'exp'"):
        x.exp()
    assert (x == x) is True and (x == _shared()) is False   # no eq op: identity, as for any object
    with pytest.raises(p2pgrid.BadRequest, match="divided by a public number"):
        x / x
    with pytest.raises(p2pgrid.BadRequest, match="boolean tensors"):
        x + torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="truth value"):
        bool(x)
    with pytest.raises(TypeError, match="truth value"):
        bool(_pointer())


def test_mixing_values_evaluated_in_different_places_is_refused():
    a, x = _pointer(shape=(4, 3)), _shared(shape=(4, 3))
    with pytest.raises(p2pgrid.BadRequest, match=r"is a plaintext value on h, not a shared tensor; "
                                                 r"share it first"):
        x + a
    with pytest.raises(p2pgrid.BadRequest, match=r"is a shared tensor among p1,p2 \(dealer dealer\), "
                                                 r"not a plaintext value"):
        a + x
    with pytest.raises(p2pgrid.BadRequest, match="different peers"):
        a + _pointer("k", shape=(4, 3))
    with pytest.raises(p2pgrid.BadRequest, match="different groups"):
        x + _shared(group=Group(("p1", "p3"), "dealer"))
    with pytest.raises(p2pgrid.BadRequest, match="different peers"):   # inside an index too
        a[_pointer("k", shape=(4,)) > 0]
    other = _Net()
    with pytest.raises(p2pgrid.BadRequest, match="different connections"):
        a + Pointer(other, "h", {"id": "o2", "shape": [4, 3], "dtype": "float32"})


def test_shared_tensors_display_as_html_tables_too():
    g = Group(("<b>p1</b>", "p2"), "dealer")
    html = (_shared(group=g) + 1)._repr_html_()
    assert "&lt;b&gt;p1&lt;/b&gt;" in html and "<b>" not in html and "add" in html
    assert ">s1<" in _shared()._repr_html_()
    assert isinstance(_pointer() + 1, Expr) and isinstance(_shared() + 1, SharedTensor)


def _imports(path: Path) -> set[str]:
    """Modules `path` imports at run time (inside functions too; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_network_pointer_and_smpc_do_not_import_each_other_in_a_circle():
    """network -> pointer -> expr <- smpc; plugins reach pointers through the Network."""
    plain = {"p2pgrid/pointer.py", "p2pgrid/expr.py"}
    for f in plain:
        bad = {m for m in _imports(ROOT / f) if m.startswith(("p2pgrid.network", "p2pgrid.smpc",
                                                                 "p2pgrid.governance"))}
        assert not bad, f"{f} imports {bad}"
    for f in sorted((ROOT / "p2pgrid/smpc").glob("*.py")):
        bad = {m for m in _imports(f) if m.startswith(("p2pgrid.pointer", "p2pgrid.network"))}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
