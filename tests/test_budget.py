"""Program budgets (p2pgrid.budget) and the worker pool that runs programs (p2pgrid.worker)."""

import pytest
import torch
import trio

from p2pgrid.budget import Limits, Meter, limits_for
from p2pgrid.config import PeerConfig, load_profile
from p2pgrid.errors import ComputeLimitExceeded, RateLimited
from p2pgrid.messages import Execute
from p2pgrid.ops import Level, evaluate
from p2pgrid.testing import open_network
from p2pgrid.worker import Programs

MB4 = 1000 * 1000 * 4


def meta_leaf(oid):
    return torch.empty(1000, 1000, device="meta"), Level("row", 0, 1000)


def chain(n):
    nodes = [{"op": "leaf", "obj": "x"}]
    nodes += [{"op": "add", "args": [{"$": i}, 1.0]} for i in range(n)]
    return {"nodes": nodes}


def test_intermediates_are_freed_after_their_last_use():
    meter = Meter(Limits(memory=4 * MB4))
    evaluate(chain(50), meta_leaf, device="meta", meter=meter)
    assert meter.peak == 2 * MB4   # one input and one output at a time, not 51 values


def test_values_alive_at_once_count_together():
    nodes = [{"op": "leaf", "obj": "x"}] + [{"op": "mul", "args": [{"$": 0}, 2.0]} for _ in range(8)]
    total = 1
    for i in range(2, 9):
        nodes.append({"op": "add", "args": [{"$": total}, {"$": i}]})
        total = len(nodes) - 1
    with pytest.raises(ComputeLimitExceeded, match="program_memory") as e:
        evaluate({"nodes": nodes}, meta_leaf, device="meta", meter=Meter(Limits(memory=6 * MB4)))
    assert e.value.status == 422 and e.value.details["limit"] == "program_memory"


def test_views_share_their_base():
    nodes = [{"op": "leaf", "obj": "x"},
             {"op": "t", "args": [{"$": 0}]},
             {"op": "getitem", "args": [{"$": 1}, {"slice": [0, 500, None]}]},
             {"op": "sum", "args": [{"$": 2}]}]
    meter = Meter(Limits())
    evaluate({"nodes": nodes}, meta_leaf, device="meta", meter=meter)
    assert meter.peak == MB4 + 4   # the leaf, then the sum


def test_a_mask_selection_is_sized_at_its_worst_case_only_inside_the_dry_run():
    import torch.fx.experimental._config as fx_config
    nodes = [{"op": "leaf", "obj": "x"},
             {"op": "gt", "args": [{"$": 0}, 0.0]},
             {"op": "getitem", "args": [{"$": 0}, {"$": 1}]}]
    out, _ = evaluate({"nodes": nodes}, meta_leaf, device="meta", meter=Meter(Limits()))
    assert out.shape == (1000 * 1000,)   # every element picked: the most it can cost
    assert fx_config.meta_nonzero_assume_all_nonzero is False   # a user's meta tensors keep torch's rule
    with pytest.raises(Exception):
        torch.empty(3, device="meta").nonzero()


def test_constants_count_and_flops_add_up():
    prog = {"nodes": [{"op": "matmul", "args": [{"tensor": torch.ones(100, 50)}, {"tensor": torch.ones(50, 20)}]}]}
    meter = Meter(Limits())
    evaluate(prog, meta_leaf, device="meta", meter=meter)
    assert meter.flops == 2 * 100 * 20 * 50
    assert meter.peak == (100 * 50 + 50 * 20 + 100 * 20) * 4
    with pytest.raises(ComputeLimitExceeded, match="program_flops"):
        evaluate(prog, meta_leaf, device="meta", meter=Meter(Limits(flops=1e5)))


def test_limits_per_caller_from_a_profile(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[peer]\nname = "h"\nprogram_seconds = 5\nprograms_running = 1\n'
                    '[peer.program_limits.ana]\nseconds = 100\nmemory = 1e3\n')
    cfg = load_profile(path)
    assert limits_for(cfg, "bob") == Limits(seconds=5, running=1)
    assert limits_for(cfg, "ana") == Limits(seconds=100, running=1, memory=1e3)
    with pytest.raises(ValueError):
        Limits(seconds=0)


async def test_worker_runs_programs_and_stops_them(tmp_path):
    cfg = PeerConfig(name="h", program_inline_flops=0, programs_running=1, program_flops=1e12)
    async with open_network([cfg, "bob"], tmp_path) as grid:
        h, bob = grid["h"], grid["bob"]
        x = torch.randn(300, 4)
        meta = await h.publish(x, tags=["#x"], compute=["bob"], aggregate=["bob"])
        mean = {"nodes": [{"op": "leaf", "obj": meta.id}, {"op": "mean", "args": [{"$": 0}], "kwargs": {"dim": 0}}]}
        got = await bob.request("h", Execute(mean, fetch=True), timeout=180)
        assert torch.allclose(got.value, x.mean(0))
        programs = Programs.of(h)
        (worker,) = programs._idle
        await trio.sleep(12)   # longer than trio keeps an idle thread: the worker outlives it
        got = await bob.request("h", Execute(mean, fetch=True), timeout=60)
        assert torch.allclose(got.value, x.mean(0)) and programs._idle == [worker]
        assert worker.process.returncode is None

        # one program at a time for bob here; a second is refused, naming the limit
        slow = {"nodes": [{"op": "add", "args": [{"tensor": torch.ones(2048, 1)}, {"tensor": torch.ones(1, 2048)}]},
                          {"op": "matmul", "args": [{"$": 0}, {"$": 0}]},
                          {"op": "matmul", "args": [{"$": 1}, {"$": 0}]},
                          {"op": "sum", "args": [{"$": 2}]}]}
        async with trio.open_nursery() as n:
            async def first():
                await bob.request("h", Execute(slow, fetch=True), timeout=120)
            n.start_soon(first)
            with trio.fail_after(30):
                while not programs._running:
                    await trio.sleep(0.01)
            with pytest.raises(RateLimited, match="programs_running"):
                await bob.request("h", Execute(slow, fetch=True), timeout=60)
            n.cancel_scope.cancel()   # bob gives up on the first: its worker is killed
        with trio.fail_after(10):
            while worker.process.returncode is None or programs._running:
                await trio.sleep(0.05)


async def test_a_caller_that_disconnects_stops_its_program(tmp_path):
    cfg = PeerConfig(name="h", program_inline_flops=0, program_flops=1e12)
    async with open_network([cfg, "bob"], tmp_path) as grid:
        h = grid["h"]
        small = {"nodes": [{"op": "sum", "args": [{"tensor": torch.ones(10)}]}]}
        await grid["bob"].request("h", Execute(small, fetch=True), timeout=180)   # a worker ready
        programs = Programs.of(h)
        (worker,) = programs._idle
        slow = {"nodes": [{"op": "add", "args": [{"tensor": torch.ones(4096, 1)}, {"tensor": torch.ones(1, 4096)}]},
                          {"op": "matmul", "args": [{"$": 0}, {"$": 0}]},
                          {"op": "sum", "args": [{"$": 1}]}]}

        async def send():
            with pytest.raises(Exception):   # noqa: B017 - its own peer is gone: any error
                await grid["bob"].request("h", Execute(slow, fetch=True), timeout=120)
        async with trio.open_nursery() as n:
            n.start_soon(send)
            with trio.fail_after(30):
                while not programs._running:
                    await trio.sleep(0.01)
            await grid.stop("bob")   # its connections close with it; nobody waits for the answer
            with trio.fail_after(5):
                while worker.process.returncode is None:
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()


def test_a_remembered_dry_run_is_checked_anew_when_limits_or_objects_change(tmp_path):
    # A passed dry run is remembered (a client repeating a program is not re-evaluated),
    # but only under everything its outcome depends on: limits, leaf shapes and levels.
    from dataclasses import replace
    from types import SimpleNamespace

    peer = SimpleNamespace(config=PeerConfig(name="h", data_dir=tmp_path, program_memory=10 * MB4),
                           extensions={})
    programs = Programs(peer)
    bob, ana = SimpleNamespace(name="bob", key_id="b"), SimpleNamespace(name="ana", key_id="a")
    row = Level("row", 0, 1000)
    leaves = {"x": (SimpleNamespace(shape=(1000, 1000), dtype="float32"), row)}
    prog = chain(1)

    first = programs.dry_run(bob, prog, leaves, min_rows=1)
    assert programs.dry_run(bob, chain(1), leaves, min_rows=1) is first   # remembered
    flops = first.meter.flops

    # the owner lowers the FLOP limit right after: the same program is refused at once
    peer.config = replace(peer.config, program_flops=1e5)
    with pytest.raises(ComputeLimitExceeded, match="program_flops"):
        programs.dry_run(bob, prog, leaves, min_rows=1)
    # a per-caller override counts too, for that caller only
    peer.config = replace(peer.config, program_flops=2e10, program_limits={"bob": {"flops": 1e5}})
    with pytest.raises(ComputeLimitExceeded, match="program_flops"):
        programs.dry_run(bob, prog, leaves, min_rows=1)
    assert programs.dry_run(ana, prog, leaves, min_rows=1).meter.flops == flops

    # another object under the same id: its own shape is checked (8 vs 48 MB at once)
    peer.config = replace(peer.config, program_limits={})
    programs.dry_run(bob, prog, leaves, min_rows=1)
    bigger = {"x": (SimpleNamespace(shape=(6000, 1000), dtype="float32"), Level("row", 0, 6000))}
    with pytest.raises(ComputeLimitExceeded, match="program_memory"):
        programs.dry_run(bob, prog, bigger, min_rows=1)
    # a changed level or min_rows is a new dry run, not the remembered one
    again = programs.dry_run(bob, prog, leaves, min_rows=1)
    assert programs.dry_run(bob, prog, leaves, min_rows=5) is not again
    aggregate = {"x": (leaves["x"][0], Level("aggregate"))}
    assert programs.dry_run(bob, prog, aggregate, min_rows=1) is not again
    # refusals are not remembered as passes, and the memory stays bounded
    for n in range(300):
        programs.dry_run(bob, {"nodes": [{"op": "leaf", "obj": "x"},
                                         {"op": "add", "args": [{"$": 0}, float(n)]}]},
                         leaves, min_rows=1)
    assert len(programs._dry_runs) <= 256
