"""``p2pgrid --help`` and every subcommand's ``--help`` answer without loading torch,
numpy or the network stack (issue 16: help must be instant). Checked by what a fresh
interpreter has imported, not by timing."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "hypercorn", "httpx")

# In one fresh process: build the parser, list every command path (nested subcommands
# too), and report which heavy modules got loaded.
_LIST = """
import argparse, json, sys
from p2pgrid.cli import build_parser

def paths(parser, prefix):
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += paths(sub, prefix + [name])
    return out

parser = build_parser()
print(json.dumps({"paths": paths(parser, []),
                  "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)

# In one fresh process: run main(path + ["--help"]) and report the heavy modules loaded.
_HELP = """
import json, sys
from p2pgrid.cli import main
try:
    main(json.loads(sys.argv[1]) + ["--help"])
except SystemExit as e:
    code = e.code
else:
    code = "no SystemExit"
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_no_torch():
    listing = _run(_LIST)
    assert listing["loaded"] == []
    paths = listing["paths"]
    # the plugins' commands are declared too, not only the core ones
    assert {"peer", "fit", "models", "users", "budget", "publish"} <= {p[0] for p in paths if p}
    for path in paths:
        out = _run(_HELP, json.dumps(path))
        assert out["code"] == 0, (path, out)
        assert out["loaded"] == [], (path, out)


def test_public_api_names_still_resolve():
    out = _run("""
import json, sys
import p2pgrid
before = "torch" in sys.modules
from p2pgrid import *
print(json.dumps({"before": before, "missing": sorted(n for n in p2pgrid.__all__ if n not in globals()),
                  "perm": p2pgrid.PermissionDenied.__module__,
                  "connect": p2pgrid.connect.__module__}))
""")
    assert out["before"] is False
    assert out["missing"] == []
    assert out["perm"] == "p2pgrid.errors"
    assert out["connect"] == "p2pgrid.network"
