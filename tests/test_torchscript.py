"""TorchScript models (issue 15 item 2): traced and scripted modules are read as data and
rebuilt from the whitelists, wherever a model is accepted; what cannot be converted is
refused with the exact reason and what to pass instead."""

import pytest
import torch
import torch.nn.functional as F
import trio
from torch import nn

from p2pgrid.errors import UnknownOp
from p2pgrid.federated.coordinator import Coordinator, Plan
from p2pgrid.modelgraph import GraphModel, Untraceable, export_model, import_model
from p2pgrid.serving import Policy
from p2pgrid.smpc.model import layout_of
from p2pgrid.testing import open_network
from p2pgrid.torchscript import from_torchscript
from p2pgrid.protocols.fedavg import FedAvg


class Net(nn.Module):
    """The CNN of the Grid MLaaS tutorial's kind: conv, pooling, view, linear, log_softmax."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, 1)
        self.conv2 = nn.Conv2d(8, 16, 5, 1, padding=1)
        self.fc1 = nn.Linear(5 * 5 * 16, 32)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 5 * 5 * 16)
        x = F.relu(self.fc1(x))
        x = self.fc2(self.drop(x))
        return F.log_softmax(x, dim=1)


def traced_net():
    torch.manual_seed(0)
    model = Net().eval()
    example = torch.rand(1, 1, 28, 28)
    return model, torch.jit.trace(model, example)


async def test_the_mlaas_tutorials_traced_model_is_served_and_queried(tmp_path):
    model, traced = traced_net()
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        await grid.net("hospital").serve_model(traced, "skin", policy=Policy(
            input_shape=(None, 1, 28, 28), dtype="float32", users=["bob"]))
        bob = grid.net("bob")
        with trio.fail_after(10):
            while not [i for i in bob.models() if i.name == "skin" and i.hosts]:
                await trio.sleep(0.05)
        x = torch.rand(5, 1, 28, 28)
        y = await bob.run_inference("skin", x)
        assert torch.allclose(y, traced(x), atol=1e-5) and torch.allclose(y, model(x), atol=1e-5)


def test_traced_and_scripted_modules_convert_to_whitelisted_models():
    model, traced = traced_net()
    x = torch.rand(4, 1, 28, 28)
    plain = from_torchscript(traced)
    assert isinstance(plain, GraphModel) and not plain.training
    assert torch.allclose(plain(x), model(x), atol=1e-6)
    back = import_model(export_model(traced)).eval()    # export_model takes it directly too
    assert torch.allclose(back(x), model(x), atol=1e-6)
    assert {n for n, _ in plain.named_parameters()} == {n for n, _ in model.named_parameters()}
    # Sequentials, traced or scripted, come back as nn.Sequential: encrypted models take them
    seq = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    for ts in (torch.jit.trace(seq, x), torch.jit.script(seq)):
        rebuilt = from_torchscript(ts)
        assert isinstance(rebuilt, nn.Sequential) and torch.allclose(rebuilt(x), seq(x), atol=1e-6)
        assert [k for k, _ in layout_of(rebuilt)] == ["flatten", "linear", "relu", "linear"]
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.MaxPool2d(2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(3 * 7 * 7, 2), nn.LogSoftmax(dim=1))
    rebuilt = from_torchscript(torch.jit.trace(conv, x))
    assert rebuilt[0].stride == (2, 2) and rebuilt[0].padding == (1, 1)
    assert torch.allclose(rebuilt(x), conv(x), atol=1e-6)


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_federated_training_takes_a_traced_model(autojump_clock):
    from tests.test_federated import FakeLink
    lin = nn.Linear(3, 2)
    traced = torch.jit.trace(lin, torch.rand(1, 3))
    plan = Plan(job="j", data="#d", rounds=1, strategy=FedAvg(min_peers=2, round_timeout=30))
    res = await Coordinator(FakeLink({"a": 1.0, "b": 1.0}), plan, traced, progress=False).run()
    assert torch.allclose(res.params["weight"], lin.weight + 1.0)
    assert isinstance(res.model, nn.Linear) and torch.equal(res.model.weight, res.params["weight"])


def test_what_cannot_be_converted_says_so():
    class Sorts(nn.Module):
        def forward(self, x):
            return x.sort(dim=1).values
    with pytest.raises(UnknownOp, match="aten::sort"):
        from_torchscript(torch.jit.trace(Sorts(), torch.rand(2, 3)))
    _, traced = traced_net()
    with pytest.raises(Untraceable, match="prim::CallFunction.*pass the plain nn.Module"):
        from_torchscript(torch.jit.script(Net().eval()))      # compiled Python, not a graph
    del traced

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)
    with pytest.raises(Untraceable, match="custom Block.*pass the plain nn.Module"):
        from_torchscript(torch.jit.trace(Outer(), torch.rand(2, 3)))
