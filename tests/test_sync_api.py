"""The blocking API (p2pgrid.sync) from plain functions and from asyncio: real peers, real sockets.

These tests are plain ``def``s (no trio): the peers run on background threads, as in a notebook.
"""

import _thread
import asyncio
import threading
import time

import pytest
import torch

import p2pgrid
from p2pgrid.datasets import birth_records
from p2pgrid.sync import connect_asyncio, connect_sync, open_network_sync

BIRTHS = birth_records(120, seed=5)


def _trio_threads():
    return [t for t in threading.enumerate() if t.name.endswith("-trio") and t.is_alive()]


@pytest.fixture
def grid(tmp_path):
    before = len(_trio_threads())
    # a long ttl: on a loaded machine a 5 s record can lapse between gossip rounds
    with open_network_sync(["hospital", "clinic", "bob"], tmp_path, ttl=30.0) as g:
        hospital = g.net("hospital")
        ptr = hospital.publish(BIRTHS, tags=["birth-records"], description="births",
                               compute=["*"], aggregate=["*"])
        assert isinstance(ptr, p2pgrid.sync._Proxy) and ptr.shape == (120, 3)
        g.wait_searchable("#birth-records")
        yield g
    assert len(_trio_threads()) == before  # the grid's thread is gone


def _seed(grid):
    peer = grid["hospital"]
    return f"{peer.key_id}@{peer.address}"


def test_blocking_search_compute_smpc(grid):
    net = grid.net("bob")
    hits = net.search("#birth-records")
    rec = hits["hospital"][0]
    assert "Pointer hospital/" in repr(rec) and rec.tags == ["birth-records"]
    avg = (rec[:, 0].sum() / rec.shape[0]).get()          # operators and methods, all blocking
    assert torch.allclose(avg, BIRTHS[:, 0].mean(), atol=1e-5)
    assert torch.allclose(rec.mean(dim=0).get(), BIRTHS.mean(dim=0), atol=1e-4)
    with pytest.raises(p2pgrid.PermissionDenied):
        rec.get()                                           # errors arrive as the async API's
    with pytest.raises(p2pgrid.ShapeError):
        rec @ torch.ones(4)

    # SMPC: share and reveal through the same generated proxy
    x = net.share(torch.arange(6.0).reshape(2, 3), parties=["hospital", "clinic"], dealer="bob")
    y = (x * 2 + 1).reveal()
    assert torch.allclose(y.double(), torch.arange(6.0).reshape(2, 3).double() * 2 + 1, atol=1e-3)


def test_connect_sync_joins_and_closes_cleanly(grid, tmp_path):
    before = len(_trio_threads())
    with connect_sync("carol", join=[_seed(grid)], mdns=False, data_dir=tmp_path / "carol") as net:
        assert len(_trio_threads()) == before + 1
        hits = net.search("#birth-records", wait=20)
        assert list(hits) == ["hospital"]
        assert "hospital" in net.peers()
    assert net.closed and len(_trio_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        net.search("#birth-records")


def test_interrupt_cancels_call_and_peer_stays_usable(grid):
    """SIGINT in the calling thread (Ctrl-C, Jupyter's interrupt) cancels the call in progress."""
    assert threading.current_thread() is threading.main_thread()
    net = grid.net("bob")
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        net.wait_for_peers(["nobody"], timeout=60)         # would block a minute
    timer.join()
    assert time.monotonic() - t0 < 30
    # the peer keeps running and answers the next call
    rec = net.search("#birth-records")["hospital"][0]
    assert torch.allclose(rec[:, 1].mean().get(), BIRTHS[:, 1].mean(), atol=1e-4)


def test_governance_requests_through_the_blocking_api(grid):
    """A scientist files requests from blocking code and blocks in ``wait()`` while the owner,
    on another thread (another notebook), approves them from its own blocking handle."""
    owner, net = grid.net("hospital"), grid.net("bob")
    rec = net.search("#birth-records")["hospital"][0]

    # a release request: this exact program, which the gate alone does not release
    heavy = (rec[:, 1] * (rec[:, 0] > 3)).sum()
    with pytest.raises(p2pgrid.PermissionDenied, match="approve this program"):
        heavy.get()
    release = heavy.request_release(reason="length of the heavier births")
    assert isinstance(release, p2pgrid.sync._Proxy) and release.status == "pending"

    # an access request: ``get`` on the whole object
    with pytest.raises(p2pgrid.PermissionDenied):
        rec.get()
    access = rec.request_access(reason="an audit of the rows")
    pending = {r["id"]: r["right"] for r in owner.access_requests("hospital")}
    assert pending == {release.id: "program", access.id: "get"}

    def approve():
        owner.decide_request("hospital", release.id, approve=True, why="fine")
        owner.decide_request("hospital", access.id, approve=True, why="audit")
    decider = threading.Timer(0.5, approve)
    decider.start()
    assert access.wait(timeout=60).approved              # blocks until the owner decided
    decider.join()
    assert release.refresh().approved and release.why == "fine" and access.why == "audit"
    assert torch.allclose(heavy.get(), (BIRTHS[:, 1] * (BIRTHS[:, 0] > 3)).sum(), rtol=1e-5)
    assert torch.equal(rec.get(), BIRTHS)
    assert owner.access_requests("hospital") == []       # nothing pending any more
    with pytest.raises(p2pgrid.Conflict):
        owner.decide_request("hospital", access.id, approve=False)


def test_from_asyncio(grid, tmp_path):
    seed = _seed(grid)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.ensure_future(ticker())
        async with connect_asyncio("dora", join=[seed], mdns=False,
                                   data_dir=tmp_path / "dora") as net:
            hits = await net.search("#birth-records", wait=20)
            rec = hits["hospital"][0]
            got = await rec[:, 2].mean().get()
            # a long call cancelled from asyncio cancels the trio task; the peer stays usable
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(net.wait_for_peers(["nobody"], timeout=60), 0.5)
            again = await rec[:, 2].mean().get()
        tick.cancel()
        return got, again, ticks

    got, again, ticks = asyncio.run(main())
    assert torch.allclose(got, BIRTHS[:, 2].mean(), atol=1e-4) and torch.equal(got, again)
    assert ticks > 5                                        # the asyncio loop kept running

    # the aio face of a blocking handle uses the same bridge
    net = grid.net("bob")

    async def via_aio():
        return await net.aio.search("#birth-records")
    assert list(asyncio.run(via_aio())) == ["hospital"]


def test_rich_display_is_escaped_html(grid):
    hospital, net = grid.net("hospital"), grid.net("bob")
    hospital.publish(torch.zeros(2, 2), tags=["evil"], description="<script>alert(1)</script>",
                     compute=["*"])
    hits = net.search("#evil", wait=20)
    assert type(hits).__name__ == "SearchResult"            # the proxy keeps the dict's type
    page = hits._repr_html_()
    assert "<table>" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in page
    ptr = hits["hospital"][0]
    assert "&lt;script&gt;" in ptr._repr_html_() and "<Pointer hospital/" in repr(ptr)
    assert "mean" in ptr.mean()._repr_html_() and repr(ptr.mean()).startswith("<Expr mean")
    page = net.me.directory._repr_html_()
    assert all(name in page for name in ("hospital", "clinic", "bob")) and "#evil" in page

    from p2pgrid.federated.options import FitResult, RoundRecord
    fit = FitResult(model=torch.nn.Linear(1, 1), params={}, job="j<1>",
                    history=[RoundRecord(round=1, peers=["a", "b"], loss=0.5, accuracy=0.9)])
    page = fit._repr_html_()
    assert "j&lt;1&gt;" in page and "<td>0.9</td>" in page and "<td>a, b</td>" in page


def test_interpreter_exit_stops_an_unclosed_peer(tmp_path):
    """A script (or kernel) that never calls close() still exits, its peer stopped at exit."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    # registered first, this handler runs last (atexit is LIFO): after p2pgrid's own
    code = ("import atexit, threading\n"
            "atexit.register(lambda: print('left:', [t.name for t in threading.enumerate()\n"
            "                                        if t.name.endswith('-trio')], flush=True))\n"
            "import os\n"
            "def sockets():\n"
            "    n = 0\n"
            "    for fd in os.listdir('/proc/self/fd'):\n"
            "        try:\n"
            "            n += os.readlink(f'/proc/self/fd/{fd}').startswith('socket:')\n"
            "        except OSError:\n"
            "            pass\n"
            "    return n\n"
            "atexit.register(lambda: print('sockets:', sockets(), flush=True))\n"
            "import p2pgrid\n"
            "print('sockets before:', sockets(), flush=True)\n"
            f"net = p2pgrid.connect_sync('solo', mdns=False, wait=0, data_dir={str(tmp_path)!r})\n"
            "print(net.me.name, [t.name for t in threading.enumerate()], flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "solo-trio" in proc.stdout                      # it was running on its thread
    assert "left: []" in proc.stdout                       # stopped before the interpreter died
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if line.startswith("sockets"))
    assert int(lines["sockets"]) <= int(lines["sockets before"])   # and closed its sockets
    assert "Traceback" not in proc.stderr
