"""Attack (issue 14, 7): a peer whose clock is 90 s off drops out silently.

Signed requests outside the +-60 s window are refused (rightly), but nobody was told
why. Now the peer refusing them logs it at WARNING (one line per peer a minute, naming
it and the offset), and the skewed peer warns at start that its clock disagrees with
the peers it reached. The skewed peer is a real process whose clock runs 90 s ahead.
"""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pgrid.auth import Verifier, sign_request
from p2pgrid.config import PeerConfig
from p2pgrid.errors import ReplayDetected
from p2pgrid.identity import Identity
from p2pgrid.peer import open_peer

ROOT = Path(__file__).resolve().parents[2]
SKEW = 90.0

SITECUSTOMIZE = """\
import os, time
_offset = float(os.environ["P2PGRID_TEST_CLOCK_SKEW"])
_real = time.time
time.time = lambda: _real() + _offset
"""


async def test_skewed_peer_is_told_and_reported(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    skewed_site = tmp_path / "skewed-site"
    skewed_site.mkdir()
    (skewed_site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cfg = PeerConfig(name="hospital", data_dir=tmp_path / "hospital", mdns=False,
                     gossip_interval=0.2)
    async with open_peer(cfg) as hospital:
        env = dict(os.environ, P2PGRID_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
                   P2PGRID_TEST_CLOCK_SKEW=str(SKEW),
                   PYTHONPATH=os.pathsep.join([str(skewed_site), str(ROOT)]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pgrid.cli", "peer", "--name", "skewed", "--no-mdns",
             "--gossip-interval", "0.5", "--join", f"{hospital.key_id}@{hospital.address}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        lines: list[str] = []

        async def read():
            while line := await trio.to_thread.run_sync(proc.stdout.readline,
                                                        abandon_on_cancel=True):
                lines.append(line)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                with trio.fail_after(120):
                    while not any("clock is" in ln for ln in lines) or not _refusals(caplog):
                        await trio.sleep(0.2)
                await trio.sleep(2.0)   # more rounds, all refused: still one line
                nursery.cancel_scope.cancel()
        finally:
            proc.send_signal(signal.SIGTERM)
            await trio.to_thread.run_sync(lambda: proc.wait(30))
        # the refusing side: one WARNING naming the peer and its offset
        refusals = _refusals(caplog)
        assert len(refusals) == 1, refusals
        assert "'skewed'" in refusals[0] and "+90 s" in refusals[0]
        # the skewed side, at start: its clock disagrees with the peer it reached
        warned = [ln for ln in lines if "clock is" in ln]
        assert "WARNING" in warned[0] and "ahead of" in warned[0] and "fix the clock" in warned[0]
        assert "hospital" in warned[0] or hospital.address in warned[0]
        assert hospital.directory.peers(include_self=False) == []   # refused, as before


def _refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "p2pgrid.auth" and r.levelno == logging.WARNING
            and "clock is" in r.getMessage()]


def test_skew_warnings_are_rate_limited_per_key(caplog):
    caplog.set_level(logging.WARNING, logger="p2pgrid.auth")
    server, a, b = Identity.generate(), Identity.generate(), Identity.generate()
    v = Verifier(server.key_id)
    now = 10_000.0

    def send(ident, name, sent, received):
        h = sign_request(ident, name, server.key_id, "POST", "/rpc", b"", now=sent)
        with pytest.raises(ReplayDetected) as e:
            v.verify("POST", "/rpc", h, h["x-p2p-digest"], now=received)
        return e.value

    for i in range(50):
        for ident, name in ((a, "a"), (b, "b")):
            assert send(ident, name, now + i - 120, now + i).details["clock_offset"] == 120.0
    lines = [r.getMessage() for r in caplog.records if r.name == "p2pgrid.auth"]
    assert len(lines) == 2 and all("-120 s" in ln for ln in lines)
    send(a, "a", now + 100, now + 220)                       # a minute on: said again
    assert len([r for r in caplog.records if r.name == "p2pgrid.auth"]) == 3
