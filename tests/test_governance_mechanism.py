"""The private-release mechanism without any network: sensitivities, refusals, noise."""

import math

import pytest
import torch

from p2pgrid.errors import BadRequest
from p2pgrid.governance.mechanism import Bounds, clamp, laplace, plan, run
from p2pgrid.pointer import Pointer

BOUNDS = Bounds.parse([[0, 60], [1000, 5000], [0, 1]])
SHAPE = (200, 3)


class _FakeNet:
    pass


def _rec(shape=SHAPE):
    return Pointer(_FakeNet(), "hospital", {"id": "births", "shape": list(shape), "dtype": "float32"})


def _plan(expr, bounds=BOUNDS, shape=SHAPE):
    return plan(expr.program(), {"births": (shape, bounds)})


@pytest.mark.parametrize("build, kind, sensitivity, out_shape", [
    (lambda r: r[:, 0].mean(), "mean", 60 / 200, ()),
    (lambda r: r[:, 0].sum(), "sum", 60, ()),
    (lambda r: r.sum(dim=0), "sum", 60 + 4000 + 1, (3,)),
    (lambda r: r.mean(dim=0), "mean", (60 + 4000 + 1) / 200, (3,)),
    (lambda r: r[:, 0:2].mean(), "mean", (60 + 4000) / 400, ()),
    (lambda r: r[100:, 0].mean(), "mean", 60 / 100, ()),
    (lambda r: r[::2, 0].sum(), "sum", 60, ()),
    (lambda r: (r[:, 0] > 30).sum(), "sum", 1, ()),
    (lambda r: r[:, 2].count_nonzero(), "count", 1, ()),
    (lambda r: r.count_nonzero(dim=0), "count", 3, (3,)),
    (lambda r: r[:, 0].histc(bins=6, min=0, max=60), "histogram", 2, (6,)),
    (lambda r: (r[:, 1] / 1000).sum(), "sum", 4, ()),
    (lambda r: (r[:, 1] - 3000).abs().sum(), "sum", 2000, ()),
    (lambda r: r[:, 0].clamp(min=10, max=20).sum(), "sum", 10, ()),
    (lambda r: (r[:, 0] * r[:, 2]).sum(), "sum", 60, ()),
    (lambda r: r[:, 0].sum() / 200, "sum", 60 / 200, ()),
    (lambda r: r[:, 0].sum() * -2 + 7, "sum", 120, ()),
    (lambda r: r[:, 0].sum() - r[:, 2].sum(), "sum", 61, ()),
    (lambda r: r.sum(dim=1).mean(), "mean", 4061 / 200, ()),
    (lambda r: r[:, 0].to(torch.int64).sum(), "sum", 60, ()),
])
def test_sensitivity_of_supported_queries(build, kind, sensitivity, out_shape):
    p = _plan(build(_rec()))
    assert (p.kind, p.shape) == (kind, out_shape)
    assert p.sensitivity == pytest.approx(sensitivity)


@pytest.mark.parametrize("build, message", [
    (lambda r: r[0, 0] * 1, "single records"),
    (lambda r: r[torch.tensor([0, 0, 1]), 0].sum(), "single records"),
    (lambda r: r[:, 0].max(), "not supported"),
    (lambda r: r[:, 0].var(), "not supported"),
    (lambda r: r[:, 0] * 2, "does not end in a reduction"),
    (lambda r: r[:, 0].histc(bins=5), "explicit min < max"),
    (lambda r: r[:, 0].sum() * r[:, 1].sum(), "mul of two reductions"),
    (lambda r: (r[:, 0] / r[:, 0]).sum(), "division by something that can be zero"),
    (lambda r: r[:, 0].log().sum(), "clamp first"),
    (lambda r: (r * torch.arange(200.0).reshape(200, 1)).sum(), "varies record by record"),
    (lambda r: r[:, 0].sum() + r[:, 0], "combining a reduction"),
    (lambda r: r.T.sum(dim=1), "not supported"),
])
def test_unsupported_queries_are_refused(build, message):
    with pytest.raises(BadRequest, match=message):
        _plan(build(_rec()))


def test_row_masks_are_refused():
    # a mask over records (even a constant one) is refused: built by hand, since
    # pointers cannot shape-check boolean masks on meta tensors
    mask = {"tensor": torch.arange(200) < 100}
    prog = {"nodes": [{"op": "leaf", "obj": "births"},
                      {"op": "getitem", "args": [{"$": 0}, {"tuple": [mask, 0]}]},
                      {"op": "sum", "args": [{"$": 1}], "kwargs": {}}]}
    with pytest.raises(BadRequest, match="single records"):
        plan(prog, {"births": (SHAPE, BOUNDS)})


def test_bounds_must_fit_the_dataset():
    with pytest.raises(BadRequest, match="one pair, or one per column"):
        _plan(_rec()[:, 0].sum(), bounds=Bounds.parse([[0, 1], [0, 1]]))
    with pytest.raises(BadRequest, match="lo <= hi"):
        Bounds.parse([[2, 1]])
    with pytest.raises(BadRequest, match="no declared bounds"):
        plan(_rec()[:, 0].sum().program(), {})
    one = Bounds.parse([[-1, 1]])
    assert _plan(_rec((50, 4)).sum(), bounds=one, shape=(50, 4)).sensitivity == 8
    assert _plan(_rec((50,)).mean(), bounds=one, shape=(50,)).sensitivity == pytest.approx(2 / 50)


def test_clamped_data_keeps_the_promise():
    data = torch.tensor([[-5.0, 9000.0, 0.5], [30.0, float("nan"), 1.0], [70.0, 2000.0, 3.0]])
    c = clamp(data, BOUNDS)
    assert c.tolist() == [[0.0, 5000.0, 0.5], [30.0, 1000.0, 1.0], [60.0, 2000.0, 1.0]]
    expr = _rec((3, 3))[:, 0].mean()
    p = _plan(expr, shape=(3, 3))
    assert float(run(expr.program(), p, c)) == pytest.approx(30.0)


def test_laplace_noise_has_the_promised_scale():
    value = torch.tensor([3.0, -1.0])
    sensitivity, epsilon, n = 0.3, 0.2, 20000
    b = sensitivity / epsilon
    rows = value.repeat(n, 1)   # one call: the noise is OS-seeded, no rng can be passed in
    samples = laplace(rows, sensitivity, epsilon) - rows
    var = samples.var(dim=0)
    # Laplace(b): variance 2 b^2 (sample variance sd: sqrt(5/n) relative); E|X| = b
    assert torch.all((var / (2 * b * b) - 1).abs() < 5 * math.sqrt(5 / n)), var
    assert torch.all((samples.abs().mean(dim=0) / b - 1).abs() < 0.05)
    assert torch.all(samples.mean(dim=0).abs() < 5 * math.sqrt(2) * b / math.sqrt(n))
    # the median of |X| of a Laplace(b) is b ln 2
    assert float(samples.abs().median()) == pytest.approx(b * math.log(2), rel=0.05)
    with pytest.raises(BadRequest, match="epsilon"):
        laplace(value, 1.0, 0.0)
    assert torch.equal(laplace(value, 0.0, 1.0), value.double())
