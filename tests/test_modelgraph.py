"""Models travel as whitelisted layers + an op program + tensors, and come back identical."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p2pgrid import wire
from p2pgrid.errors import BadRequest, ShapeError, UnknownOp
from p2pgrid.modelgraph import (FORMAT, GraphModel, Untraceable, export_model, import_model,
                                model_hash)


# ---------------------------------------------------------------- the models

def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Dropout(0.25))
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.head = nn.Linear(16 * 9, 10)

    def forward(self, x):
        x = self.pool(self.features(x))
        return F.log_softmax(self.head(torch.flatten(x, 1)), dim=-1)


class GRUClassifier(nn.Module):
    def __init__(self, vocab=50, dim=16, hidden=24, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.rnn = nn.GRU(dim, hidden, batch_first=True, num_layers=2)
        self.out = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.out(out[:, -1])


class LSTMTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 7, bidirectional=True)
        self.out = nn.Linear(14, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0].mean(0))


class Attention(nn.Module):
    def __init__(self, dim, heads, ctx):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.tril(torch.ones(ctx, ctx)).view(1, 1, ctx, ctx))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim, heads, ctx):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, ctx)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * dim, dim), nn.Dropout(0.1))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=4, ctx=16, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, ctx, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, ctx) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx):
        T = idx.size(1)
        x = self.tok(idx) + self.pos[:, :T]
        pos_ids = torch.arange(T, device=idx.device)  # exercises arange/getattr
        x = x + 0 * pos_ids.unsqueeze(-1).float()
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def signal_net():
    """The remaining whitelisted layers: Conv1d, BatchNorm1d, Tanh, Sigmoid, Softmax."""
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 14, 8), nn.Sigmoid(), nn.Linear(8, 3), nn.Softmax(dim=-1))


CASES = {
    "signal": (signal_net, lambda: torch.randn(5, 2, 16)),
    "mlp": (mlp, lambda: torch.randn(5, 1, 28, 28)),
    "cnn": (CNN, lambda: torch.randn(4, 1, 28, 28)),
    "gru": (GRUClassifier, lambda: torch.randint(0, 50, (6, 11))),
    "lstm": (LSTMTagger, lambda: torch.randn(9, 3, 5)),
    "gpt": (TinyGPT, lambda: torch.randint(0, 64, (3, 12))),
}


def through_wire(spec):
    return wire.loads(wire.dumps(spec))


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_wire_is_exact(case):
    make, data = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    x = data()
    spec = export_model(model)
    assert spec["format"] == FORMAT
    back = import_model(through_wire(spec)).eval()
    assert isinstance(back, GraphModel)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert back.state_dict().keys() == model.state_dict().keys()
    assert model_hash(spec) == model_hash(through_wire(spec)) == model_hash(export_model(back))


def test_mlp_has_the_asked_shape():
    spec = export_model(mlp())
    layers = spec["modules"]["children"]
    assert [layers[str(i)]["type"] for i in range(6)] == ["Flatten", "Linear", "ReLU", "Linear",
                                                          "ReLU", "Linear"]
    assert layers["1"]["kwargs"] == {"in_features": 784, "out_features": 128, "bias": True}


def test_train_mode_and_gradients_flow_through_imported_model():
    torch.manual_seed(1)
    model = CNN()
    back = import_model(through_wire(export_model(model)))
    back.train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.nll_loss(back(x), y).backward()
    assert all(p.grad is not None for p in back.parameters())
    assert int(back.features[1].num_batches_tracked) == 1
    # the trained state exports back and re-imports exactly
    again = import_model(through_wire(export_model(back))).eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(again(x), back(x))


def test_tied_and_frozen_parameters_survive():
    model = TinyGPT()
    model.ln.weight.requires_grad_(False)
    spec = export_model(model)
    assert spec["tied"] == {"head.weight": "tok.weight"}
    back = import_model(through_wire(spec))
    assert back.head.weight is back.tok.weight
    assert not back.ln.weight.requires_grad and back.ln.bias.requires_grad


def test_float64_models_keep_their_dtype():
    model = mlp().double()
    back = import_model(through_wire(export_model(model)))
    x = torch.randn(2, 784, dtype=torch.float64)
    assert back.get_submodule("1").weight.dtype == torch.float64
    assert torch.equal(back(x), model(x))


def test_tensor_constants_built_in_forward_travel():
    class WithConst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) * torch.tensor([1.0, 2.0, 3.0])

    model = WithConst()
    back = import_model(through_wire(export_model(model)))
    x = torch.randn(4, 3)
    assert torch.equal(back(x), model(x))
    assert set(back.state_dict()) == {"lin.weight", "lin.bias"}
    assert torch.equal(import_model(export_model(back))(x), model(x))


# ---------------------------------------------------------------- refusals

class Sneaky(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


def test_non_whitelisted_torch_layer_is_refused_by_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                                          dim_feedforward=8, batch_first=True))
    with pytest.raises(UnknownOp, match="Transformer"):
        export_model(model)
    with pytest.raises(UnknownOp, match="MultiheadAttention"):
        export_model(nn.MultiheadAttention(8, 2))


def test_custom_module_with_arbitrary_python_is_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 3), Sneaky())
    with pytest.raises(UnknownOp, match=r"fft.*module '1' \(Sneaky\)"):
        export_model(model)


def test_data_dependent_control_flow_is_a_clear_error():
    with pytest.raises(Untraceable, match="Branchy.*control flow"):
        export_model(nn.Sequential(Branchy()))


def test_in_place_methods_are_refused():
    class InPlace(nn.Module):
        def forward(self, x):
            return x.mul_(2)

    with pytest.raises(UnknownOp, match=r"mul_"):
        export_model(InPlace())


def good_spec():
    return export_model(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))


def test_import_refuses_unknown_layer_type():
    spec = good_spec()
    spec["modules"]["children"]["1"] = {"type": "Transformer", "kwargs": {}}
    with pytest.raises(UnknownOp, match="Transformer"):
        import_model(spec)
    spec = good_spec()
    spec["modules"]["children"]["1"] = {"type": "builtins.eval", "kwargs": {}}
    with pytest.raises(UnknownOp, match="builtins.eval"):
        import_model(spec)


def test_import_refuses_unknown_op_and_unknown_kwargs():
    spec = good_spec()
    spec["forward"][1] = {"op": "os.system", "args": ["true"], "kwargs": {}, "out": "boom"}
    with pytest.raises(UnknownOp, match="os.system"):
        import_model(spec)
    spec = good_spec()
    spec["forward"][1]["op"] = "tensor.__reduce_ex__"
    with pytest.raises(UnknownOp):
        import_model(spec)
    spec = good_spec()
    spec["modules"]["children"]["0"]["kwargs"]["device"] = "cuda"
    with pytest.raises(BadRequest, match="device"):
        import_model(spec)
    spec = good_spec()
    spec["forward"].insert(2, {"op": "getattr", "args": [{"ref": "_0"}, "__class__"],
                               "kwargs": {}, "out": "cls"})
    back = import_model(spec)  # getattr is checked at run time against its own table
    with pytest.raises(UnknownOp, match="__class__"):
        back(torch.randn(1, 4))


def test_import_checks_state_shapes_and_names():
    spec = good_spec()
    spec["state"]["0.weight"] = torch.zeros(3, 5)
    with pytest.raises(ShapeError, match=r"0.weight.*\[3, 5\].*\[3, 4\]"):
        import_model(spec)
    spec = good_spec()
    del spec["state"]["0.bias"]
    with pytest.raises(ShapeError, match="missing"):
        import_model(spec)
    spec = good_spec()
    spec["state"]["0.extra"] = torch.zeros(1)
    with pytest.raises(ShapeError, match="unexpected"):
        import_model(spec)
    spec = good_spec()
    spec["state"]["0.weight"] = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ShapeError, match="dtype"):
        import_model(spec)


def test_import_refuses_malformed_programs():
    spec = good_spec()
    spec["forward"][1]["args"] = [{"ref": "later"}]
    with pytest.raises(BadRequest, match="before it is computed"):
        import_model(spec)
    spec = good_spec()
    spec["forward"][1]["args"] = [{"pickle": "xyz"}]
    with pytest.raises(BadRequest):
        import_model(spec)
    spec = good_spec()
    spec["forward"][1]["target"] = "0.weight"
    with pytest.raises(BadRequest, match="no whitelisted layer"):
        import_model(spec)
    spec = good_spec()
    spec["forward"][1]["kwargs"] = {"out": {"ref": "input_1"}}
    with pytest.raises(UnknownOp, match="out="):
        import_model(spec)
    spec = good_spec()
    spec["format"] = "pickle"
    with pytest.raises(BadRequest, match="format"):
        import_model(spec)
    with pytest.raises(BadRequest):
        import_model({"format": FORMAT, "modules": [], "forward": [], "state": {}})


def test_huge_layers_are_checked_before_anything_is_allocated():
    spec = good_spec()
    spec["modules"]["children"]["0"]["kwargs"]["in_features"] = 1 << 30
    with pytest.raises(ShapeError):  # built on the meta device, then refused on shape
        import_model(spec)


def test_runtime_errors_become_shape_errors():
    back = import_model(good_spec())
    with pytest.raises(ShapeError, match="module"):
        back(torch.randn(2, 7))


def test_model_hash_is_canonical_and_sensitive():
    torch.manual_seed(0)
    model = mlp()
    spec = export_model(model)
    shuffled = dict(reversed(list(spec.items())))
    assert model_hash(spec) == model_hash(shuffled) == model_hash(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[1].bias[0] += 1e-6
    assert model_hash(other) != model_hash(spec)
    assert len(model_hash(spec)) == 64


# ---------------------------------------------------------------- fuzzing the importer

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from p2pgrid.errors import P2PError  # noqa: E402

_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["ref", "tuple", "slice", "module", "attr", "Linear", "tensor.view", "0",
                       "input_1", "_0", "0.weight"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["ref", "tuple", "slice", "dtype", "type", "kwargs", "op", "out", "args"]),
        inner, max_size=2),
    max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


_SPEC = export_model(nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Flatten(0)))
_PATHS = [p for p in _paths(_SPEC) if p]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_PATHS), _junk)
def test_mutated_specs_fail_only_with_typed_errors(path, junk):
    spec = copy.deepcopy(_SPEC)
    node = spec
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = junk
    try:
        back = import_model(spec)
        back(torch.randn(2, 4))
    except P2PError:
        pass


def test_programs_cannot_ask_for_unbounded_work():
    def with_step(op, args):
        spec = good_spec()
        spec["forward"].insert(1, {"op": op, "args": args, "kwargs": {}, "out": "bomb"})
        return import_model(spec)

    x = torch.randn(1, 4)
    with pytest.raises(ShapeError, match="limit"):
        with_step("torch.ones", [1 << 20, 1 << 20])(x)
    with pytest.raises(ShapeError, match="limit"):
        with_step("torch.arange", [0, 1 << 40])(x)
    with pytest.raises(ShapeError, match="limit"):
        with_step("tensor.repeat", [{"ref": next(iter(good_spec()["forward"]))["out"]}, 1 << 20, 1 << 20])(x)
    with pytest.raises(UnknownOp, match="exponent"):
        with_step("operator.pow", [2, 1 << 40])(x)
    with pytest.raises(UnknownOp, match="sequence"):
        with_step("operator.mul", ["x", 1 << 40])(x)
    with pytest.raises(BadRequest, match="int64"):
        with_step("operator.add", [1 << 70, 1])
    assert with_step("torch.ones", [2, 3])(x).shape == (1, 3)  # small ones still work


@pytest.mark.parametrize("name", ["training", "forward", "_modules", "0"])
def test_container_names_cannot_shadow_module_attributes(name):
    spec = good_spec()
    spec["modules"]["params"] = {name: {"shape": [1]}}
    spec["state"][name] = torch.zeros(1)
    with pytest.raises(BadRequest, match="used twice"):
        import_model(spec)
