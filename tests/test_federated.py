"""Federated learning without the network: data convention, privacy ledger, the round loop
over an in-memory link (deadlines under trio's MockClock), checkpoints, the CLI's parser."""

import math

import pytest
import torch
import trio
import trio.testing
from torch import nn

from p2pgrid.directory import ObjectSummary
from p2pgrid.errors import BadRequest, PeerUnavailable, PermissionDenied, ProtocolError, UnknownOp
from p2pgrid.federated import SGD, Adam, ClientDP, FedAvg, PrivacyBudgetExceeded, RoundRecord
from p2pgrid.federated.checkpoint import Checkpoints
from p2pgrid.federated.coordinator import Coordinator, Plan
from p2pgrid.federated.data import pairs_of
from p2pgrid.federated.ledger import PrivacyLedger, round_cost
from p2pgrid.federated.messages import Probe, ProbeRes, Train
from p2pgrid.protocols.dp import RDPAccountant, rdp_curve
from p2pgrid.protocols.fedavg import FitRes


def summary(id, *tags, rows=10):
    return ObjectSummary(id, list(tags), "", [rows, 3], "float32", "o")


def test_pairs_follow_the_x_y_convention():
    objs = [summary("a", "mnist", "train", "x"), summary("b", "mnist", "train", "y"),
            summary("c", "mnist", "train", "x", "v2"), summary("d", "mnist", "train", "y", "v2"),
            summary("e", "mnist", "train", "x", "lonely"), summary("f", "mnist", "train"),
            summary("g", "mnist", "test", "x"), summary("h", "mnist", "test", "y")]
    assert pairs_of(objs, "#mnist #train") == [["a", "b"], ["c", "d"]]
    assert pairs_of(objs, "#MNIST #train #v2") == [["c", "d"]]
    assert pairs_of(objs, "#mnist #test #x") == [["g", "h"]]   # role tags in a query are ignored
    assert pairs_of(objs, "#cifar") == []


def test_options_become_checked_wire_configs():
    assert SGD(lr=0.1).to_config() == {"name": "sgd", "lr": 0.1}
    assert Adam(lr=0.01).to_config()["betas"] == [0.9, 0.999]
    assert ClientDP(clip=2.0, noise_multiplier=0.5).to_config() == {
        "clip": 2.0, "noise_multiplier": 0.5, "delta": 1e-5}
    with pytest.raises(BadRequest):
        ClientDP(clip=0.0)
    rec = RoundRecord(round=1, peers=["a"], bytes_sent=3, bytes_received=4)
    assert rec.bytes == 7 and RoundRecord.from_dict(rec.to_dict()) == rec


def test_ledger_caps_charges_refunds_and_persists(tmp_path):
    path = tmp_path / "privacy.cbor"
    led = PrivacyLedger(path)
    one = round_cost({"client": {"noise_multiplier": 1.1, "sample_rate": 1.0}})
    acc = RDPAccountant()
    acc.step(1.1, 1.0, 2)
    led.set_cap(acc.epsilon(1e-5) + 1e-3, objects=["x1"])
    led.charge(["x1", "y1"], one)
    token = led.charge(["x1", "y1"], one)
    assert led.spent("x1", 1e-5) == pytest.approx(acc.epsilon(1e-5))
    with pytest.raises(PrivacyBudgetExceeded, match="exhausted.*cap"):
        led.charge(["x1"], one)
    led.refund(token)
    led.charge(["x1"], one)  # the refunded release is available again
    with pytest.raises(PrivacyBudgetExceeded, match="only be trained on with differential privacy"):
        led.check(["x1"], None)
    led.charge(["y1"], None)            # uncapped: a release without DP is allowed...
    assert led.spent("y1", 1e-5) == math.inf
    led.set_cap(100.0)                  # ...but closes the object once the owner sets a cap
    with pytest.raises(PrivacyBudgetExceeded):
        led.check(["y1"], one)
    again = PrivacyLedger(path)         # a restart keeps caps and spending
    assert again.report(["x1"])["x1"]["releases"]["private"] == 2
    assert again.cap("anything")["epsilon"] == 100.0
    assert issubclass(PrivacyBudgetExceeded, PermissionDenied)


def test_a_round_protected_twice_costs_the_smaller_curve():
    client = {"noise_multiplier": 1.0, "sample_rate": 1.0}
    local = {"noise_multiplier": 1.0}
    both = round_cost({"client": client, "local": local}, num_examples=1000, batch_size=10, epochs=1)
    c = round_cost({"client": client})
    loc = round_cost({"local": local}, num_examples=1000, batch_size=10, epochs=1)
    assert all(b == min(x, y) for b, x, y in zip(both, c, loc))
    assert round_cost({"client": client}, trust_client_dp=False) is None
    assert c == rdp_curve(1.0, 1.0)


# ------------------------------------------------------------------ the loop over a fake link

class FakeLink:
    """Peers in memory: each answers a Train with a fixed update, or never answers."""

    def __init__(self, updates, *, stalled=(), refuse=()):
        self.updates, self.stalled, self.refuse = updates, set(stalled), set(refuse)
        self.sent = self.received = 0
        self.trained = []

    def shards(self, query):
        return {p: [[f"{p}-x", f"{p}-y"]] for p in self.updates}

    def public_key(self, peer):
        return None

    async def request(self, peer, msg, timeout):
        with trio.fail_after(timeout):
            if isinstance(msg, Probe):
                if peer in self.refuse:
                    raise PermissionDenied(f"ai has no compute right on object {peer}-x")
                return ProbeRes(10)
            assert isinstance(msg, Train)
            if peer in self.stalled:
                await trio.sleep_forever()
            self.trained.append((msg.fit.round, peer))
            delta = {k: torch.full_like(v, self.updates[peer]) for k, v in msg.fit.params.items()}
            return FitRes(peer, delta, 10, {"loss": 1.0, "train_seconds": 0.5}, delta=True,
                          round=msg.fit.round)


def plan(**kw):
    args = dict(job="j", data="#d", rounds=2, strategy=FedAvg(min_peers=2, round_timeout=30))
    args.update(kw)
    return Plan(**args)


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_round_closes_at_its_deadline_with_the_peers_that_answered(autojump_clock):
    link = FakeLink({"a": 1.0, "b": 3.0, "c": 100.0, "d": 0.0}, stalled=["c"], refuse=["d"])
    model = nn.Linear(2, 1)
    start = trio.current_time()
    res = await Coordinator(link, plan(), model, progress=False).run()
    assert trio.current_time() - start == pytest.approx(60, abs=1)   # two rounds, c never answers
    assert [h.peers for h in res.history] == [["a", "b"], ["a", "b"]]
    assert "deadline" in res.history[0].failures["c"] and "compute right" in res.excluded["d"]
    assert torch.allclose(res.params["weight"], model.weight + 4.0)   # 2 rounds of mean(1, 3)
    assert res.history[0].train_seconds == 0.5
    link = FakeLink({"a": 1.0, "b": 1.0, "c": 1.0}, stalled=["b", "c"])
    with pytest.raises(ProtocolError, match=r"round 1: 1 of 3 selected peers returned.*need 2.*2 did not "
                                            r"answer before the 30 s deadline: b, c"):
        await Coordinator(link, plan(), model, progress=False).run()


async def test_checkpoints_resume_and_refuse_another_model(tmp_path):
    cps = Checkpoints(tmp_path)
    link = FakeLink({"a": 1.0, "b": 1.0})
    model = nn.Linear(2, 1)
    first = await Coordinator(link, plan(rounds=2), model, checkpoints=cps, progress=False).run()
    link.trained.clear()
    more = await Coordinator(link, plan(rounds=3), model, checkpoints=cps, resume=True, progress=False).run()
    assert [r for r, _ in link.trained] == [3, 3] and len(more.history) == 3
    assert torch.allclose(more.params["weight"], first.params["weight"] + 1.0)
    with pytest.raises(BadRequest, match="another model"):
        Coordinator(link, plan(), nn.Linear(3, 1), checkpoints=cps, resume=True, progress=False)
    with pytest.raises(BadRequest, match="job name"):
        cps.path("../escape")


def test_models_outside_the_whitelist_are_refused_before_anything_is_sent():
    class Sorts(nn.Module):
        def forward(self, x):
            return x.argsort()
    with pytest.raises(UnknownOp, match="argsort"):
        Coordinator(FakeLink({}), plan(), Sorts(), progress=False)


def test_plan_checks_its_inputs():
    with pytest.raises(BadRequest, match="rounds"):
        plan(rounds=0)
    with pytest.raises(BadRequest, match="min_peers >= 2"):
        plan(secure=True, strategy=FedAvg(min_peers=1))


def test_fit_subcommand_help(capsys):
    from p2pgrid.cli import build_parser
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--secure-aggregation", "--dp-clip", "--rounds", "--resume", "--evaluate", "--join"):
        assert flag in out


async def test_unreachable_peers_are_retried_next_round():
    class Flaky(FakeLink):
        calls = 0

        async def request(self, peer, msg, timeout):
            if peer == "c" and isinstance(msg, Train) and msg.fit.round == 1:
                raise PeerUnavailable("peer at 127.0.0.1:1 is unreachable")
            return await super().request(peer, msg, timeout)

    res = await Coordinator(Flaky({"a": 1.0, "b": 1.0, "c": 1.0}), plan(), nn.Linear(2, 1),
                            progress=False).run()
    assert [h.peers for h in res.history] == [["a", "b"], ["a", "b", "c"]]


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_waits_for_data_holders_then_says_none_match(autojump_clock):
    start = trio.current_time()
    with pytest.raises(ProtocolError, match="no peer publishes data matching '#d'"):
        await Coordinator(FakeLink({}), plan(), nn.Linear(2, 1), progress=False).run()
    assert trio.current_time() - start == pytest.approx(10, abs=0.5)


# ---- issue 15 item 5: plain FedAvg sums in a fixed order

class OrderedLink(FakeLink):
    """Updates whose float sum depends on the order of addition; `order` says who answers first."""

    def __init__(self, updates, order):
        super().__init__(updates)
        self.order = order

    async def request(self, peer, msg, timeout):
        if isinstance(msg, Train):
            await trio.sleep(1 + self.order.index(peer))
        return await super().request(peer, msg, timeout)


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_fedavg_is_bit_for_bit_reproducible_whatever_the_reply_order(autojump_clock):
    updates = {"a": 1e17, "b": 1.0, "c": -1e17, "d": 3.3e-3}  # float64 sums that depend on order
    results = []
    for order in (["a", "b", "c", "d"], ["d", "c", "b", "a"], ["b", "d", "a", "c"]):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        res = await Coordinator(OrderedLink(updates, order), plan(rounds=2), model, progress=False).run()
        results.append(res.params)
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


# ---- issue 15 item 7: a round whose peers all refused says so, with a public error class

async def test_a_round_whose_peers_all_refused_names_the_refusals():
    import p2pgrid

    class Refuses(FakeLink):
        async def request(self, peer, msg, timeout):
            if isinstance(msg, Train):
                raise PermissionDenied(f"{peer} refuses: the job's DP settings exceed its cap")
            return await super().request(peer, msg, timeout)

    with pytest.raises(p2pgrid.RoundFailed) as e:
        await Coordinator(Refuses({"a": 1.0, "b": 1.0}), plan(), nn.Linear(2, 1), progress=False).run()
    msg = str(e.value)
    assert "deadline" not in msg and "2 refused or failed" in msg
    assert "a: PermissionDenied: a refuses" in msg and "b: PermissionDenied: b refuses" in msg
    assert isinstance(e.value, ProtocolError) and "RoundFailed" in p2pgrid.__all__


# ---- issue 15 items 4 and 6: wait_for, the per-round report of unused peers, clip_grad_norm

class LateLink(FakeLink):
    """Data holders that reach the directory `late[p]` seconds after the link is made;
    records the training config each peer received."""

    def __init__(self, updates, late, **kw):
        super().__init__(updates, **kw)
        self.late, self.t0, self.configs = late, trio.current_time(), {}

    def shards(self, query):
        now = trio.current_time() - self.t0
        return {p: pairs for p, pairs in super().shards(query).items() if self.late.get(p, 0) <= now}

    async def request(self, peer, msg, timeout):
        if isinstance(msg, Train):
            self.configs[peer] = msg.fit.config
        return await super().request(peer, msg, timeout)


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_wait_for_names_or_a_count_and_the_unused_report(autojump_clock):
    updates = {"a": 1.0, "b": 1.0, "c": 1.0}
    # without wait_for, round 1 starts with the two holders in sight, and says c was not seen
    res = await Coordinator(LateLink(updates, {"c": 5}), plan(rounds=1), nn.Linear(2, 1),
                            progress=False).run()
    assert res.history[0].peers == ["a", "b"]
    for wait_for in (["a", "b", "c"], 3):
        start = trio.current_time()
        res = await Coordinator(LateLink(updates, {"c": 5}), plan(rounds=1, wait_for=wait_for),
                                nn.Linear(2, 1), progress=False).run()
        assert res.history[0].peers == ["a", "b", "c"] and res.history[0].unused == {}
        assert 5 <= trio.current_time() - start < 10
    # a named peer that never comes: round 1 goes on after wait_timeout and says why it is missing
    link = LateLink({**updates, "d": 1.0}, {"c": 5, "d": 1e9}, refuse=["b"])
    res = await Coordinator(link, plan(rounds=2, wait_for=["a", "b", "c", "d"], wait_timeout=20),
                            nn.Linear(2, 1), progress=False).run()
    first, second = res.history
    assert first.peers == ["a", "c"]
    assert "compute right" in first.unused["b"] and "wait_for" in first.unused["d"]
    assert "20 s" in first.unused["d"] and set(first.unused) == {"b", "d"}
    assert set(second.unused) == {"b"} and "refused" in second.unused["b"]
    # peers the strategy did not sample are reported too
    res = await Coordinator(LateLink(updates, {}), plan(rounds=1, strategy=FedAvg(min_peers=1, fraction=0.3)),
                            nn.Linear(2, 1), progress=False).run()
    used, unused = res.history[0].peers, res.history[0].unused
    assert sorted(used + list(unused)) == ["a", "b", "c"] and unused
    assert all("not sampled by FedAvg" in why for why in unused.values())
    with pytest.raises(BadRequest, match="wait_for"):
        plan(wait_for=0)


async def test_clip_grad_norm_travels_to_the_peers_and_their_loop():
    from p2pgrid.federated.owner import _training_config
    link = LateLink({"a": 1.0, "b": 1.0}, {})
    await Coordinator(link, plan(rounds=1, clip_grad_norm=5.0), nn.Linear(2, 1), progress=False).run()
    assert link.configs["a"]["clip_grad_norm"] == 5.0
    assert _training_config(link.configs["a"])["clip_grad_norm"] == 5.0
    with pytest.raises(BadRequest, match="clip_grad_norm"):
        plan(clip_grad_norm=-1.0)
