"""The lab itself: links add what they are asked to, hosts have no way out of the lab,
and nothing is left behind: not after a clean close, nor after its owner is killed."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from p2pgrid import lab as labmod
from p2pgrid.lab import Lab, LinkSpec

pytestmark = pytest.mark.lab

ECHO = textwrap.dedent("""
    import socket, statistics, sys, time
    if sys.argv[1] == "serve":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9999))
        while True:
            d, a = s.recvfrom(100); s.sendto(d, a)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    rtts = []
    for i in range(12):
        t = time.perf_counter(); s.sendto(b"x", (sys.argv[2], 9999)); s.recvfrom(100)
        rtts.append((time.perf_counter() - t) * 1000)
    print(statistics.median(rtts[2:]))
""")


def _leftovers(lab_id: str) -> list[str]:
    ns = [n for n in labmod._netns_list() if n.startswith(f"{labmod.PREFIX}-{lab_id}")]
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return ns + [line for line in procs.splitlines() if f"/p2plab/{lab_id}/" in line]


def test_link_spec_parses_command_line_values():
    spec = LinkSpec.parse(delay="20ms", jitter="2ms", loss="0.1%", rate="100mbit")
    assert (spec.delay_ms, spec.jitter_ms, spec.loss_pct, spec.rate_bit) == (20, 2, 0.1, 100_000_000)
    assert LinkSpec.parse(rate="1gbit").rate_bit == 10 ** 9 and not LinkSpec.parse(rate="1gbit").shaped
    for bad in (dict(delay="fast"), dict(loss="200%"), dict(jitter="2ms"), dict(rate="lots")):
        with pytest.raises(ValueError):
            LinkSpec.parse(**bad)


def test_delayed_links_and_nothing_left_after_close(shaped_lab_required):
    with Lab(["a", "b"], LinkSpec.parse(delay="15ms", rate="100mbit")) as lab:
        server, _ = lab.spawn("b", ["python", "-c", ECHO, "serve"], log="echo")
        time.sleep(1)
        r = lab.run("a", ["python", "-c", ECHO, "ping", lab.address("b")], timeout=60, check=True)
        rtt = float(r.stdout)
        # a packet crosses one delayed link each way: RTT about 2 x 15 ms, more on a busy machine
        assert rtt >= 28, rtt
        routes = lab.run("a", ["ip", "-4", "route"], check=True).stdout
        assert "default" not in routes                  # no way out of the lab
        assert "10.77.0.0/24" in routes
        lab_id = lab.id
        assert _leftovers(lab_id)
    assert _leftovers(lab_id) == []
    assert not (labmod.run_root() / lab_id).exists()


BULK = textwrap.dedent("""
    import socket, sys, time
    if sys.argv[1] == "serve":
        s = socket.socket(); s.bind(("0.0.0.0", 9998)); s.listen()
        c, _ = s.accept()
        while c.recv(1 << 20):
            pass
        sys.exit(0)
    s = socket.create_connection((sys.argv[2], 9998), timeout=30)
    t = time.perf_counter()
    s.sendall(b"x" * (4 << 20))
    s.shutdown(socket.SHUT_WR); s.recv(1)
    print(time.perf_counter() - t)
""")


def test_rate_limits_a_hosts_link(lab_required):
    with Lab(["a", "b"], LinkSpec.parse(rate="20mbit")) as lab:
        server, _ = lab.spawn("b", ["python", "-c", BULK, "serve"], log="bulk")
        time.sleep(1)
        r = lab.run("a", ["python", "-c", BULK, "send", lab.address("b")], timeout=60, check=True)
        # 4 MiB at 20 Mbit/s takes 1.7 s; an unlimited veth moves it in milliseconds
        assert float(r.stdout) >= 1.4, r.stdout


OWNER = textwrap.dedent("""
    import sys, time
    from p2pgrid.lab import Lab, LinkSpec
    lab = Lab(["x", "y"], LinkSpec.parse(delay=sys.argv[1] or None)).start()
    lab.spawn("x", ["sleep", "600"], log="sleeper")
    print(lab.id, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("delay", ["", "5ms"])
def test_an_interrupted_lab_is_removed_by_the_next_start(lab_required, delay):
    if delay and labmod.vde_missing() and not labmod.has_netem():
        pytest.skip(labmod.vde_missing())
    owner = subprocess.Popen([sys.executable, "-c", OWNER, delay], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(labmod.REPO)})
    try:
        lab_id = owner.stdout.readline().strip()
        assert lab_id, "the lab did not start"
        assert _leftovers(lab_id)
    finally:
        owner.send_signal(signal.SIGKILL)   # no teardown runs
        owner.wait(timeout=10)
    assert _leftovers(lab_id)
    assert lab_id in labmod.cleanup_stale()
    assert _leftovers(lab_id) == []
