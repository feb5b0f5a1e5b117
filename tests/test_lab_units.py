"""p2pgrid.lab without a lab: what it says where it cannot run."""

import sys

import pytest

from p2pgrid import lab as labmod


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_without_root_the_lab_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(labmod.os, "geteuid", lambda: 1000)
    reason = labmod.unsupported_reason()
    assert reason and "root" in reason and "\n" not in reason
    with pytest.raises(labmod.LabError, match="root"):
        labmod.Lab(["a"]).start()
    assert labmod.cleanup_stale() == []       # touches nothing it may not


def test_host_names_are_checked_before_anything_is_created():
    for bad in (["Hospital"], ["a", "a"], ["a-b"], []):
        with pytest.raises(ValueError):
            labmod.Lab(bad)


def test_only_network_sysctls_reach_the_hosts():
    # net.* settings are per namespace; anything else would change the machine itself
    for key in ("kernel.panic", "vm.swappiness", "net.ipv4.tcp_x; rm -rf /", "net"):
        with pytest.raises(ValueError, match="only net"):
            labmod.Lab(["a"], sysctls={key: "1"})
    lab = labmod.Lab(["a"], sysctls={"net.ipv4.tcp_slow_start_after_idle": "0"})
    assert lab.sysctls == {"net.ipv4.tcp_slow_start_after_idle": "0"}
