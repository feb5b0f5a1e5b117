"""protocols/ has one name, p2pgrid.protocols: in a checkout and installed alike.

Its doctests run here, imported under that name (pytest's --doctest-modules would import
the folder as a top-level ``protocols``, which refuses: a second name would load every
module, and register every wire message, twice).
"""

import doctest
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import p2pgrid.protocols

MODULES = sorted(m.name for m in pkgutil.walk_packages(p2pgrid.protocols.__path__,
                                                       "p2pgrid.protocols."))


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    source = Path(module.__file__)      # compiled kernels (_ring128) have no source here
    if source.suffix == ".py" and ">>>" in source.read_text():
        assert result.attempted > 0, f"the examples in {name} were not found"


def test_one_name_only():
    code = ("import p2pgrid.protocols.smpc.messages, p2pgrid.smpc, p2pgrid.federated\n"
            "from p2pgrid import wire\n"
            "n = len(wire.registered())\n"
            "try:\n    import protocols.smpc.messages\nexcept ImportError as e:\n    print(e)\n"
            "assert len(wire.registered()) == n\n"
            "print(sorted(m for m in __import__('sys').modules if m.split('.')[0] == 'protocols'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "import p2pgrid.protocols, not protocols: the protocol logic installs under p2pgrid", "[]"]
