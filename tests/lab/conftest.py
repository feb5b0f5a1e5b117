"""Lab tests: peers as separate processes in separate network namespaces (p2pgrid.lab).

They need root; elsewhere they skip with the reason. Under CI (CI set) as root a skipped
lab test is a failure: the lab is what these tests exist to check, so it must not go
silently missing where it can run.
"""

import os

import pytest

from p2pgrid import lab as labmod


def _must_run() -> bool:
    return bool(os.environ.get("CI")) and os.geteuid() == 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("lab") and _must_run():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"lab test skipped under CI as root (it must run there): {reason}"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def lab_required():
    """Skip (with the reason) unless labs can run here."""
    reason = labmod.unsupported_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def shaped_lab_required(lab_required):
    """Skip unless labs with delayed/lossy links can run here (netem, or the vde tools)."""
    reason = None if labmod.has_netem() else labmod.vde_missing()
    if reason:
        pytest.skip(reason)
