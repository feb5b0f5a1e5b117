"""A non-editable install works away from the repository: `python -m p2pgrid demo` finds
its profiles as package data."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_runs_demo_outside_the_repository(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("p2pgrid-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "p2pgrid/profiles/hospital.toml" in names and "p2pgrid/py.typed" in names
    assert "p2pgrid/console/templates/owner.html" in names
    # the repository's protocols/ installs under p2pgrid, never as a top-level package
    assert "p2pgrid/protocols/__init__.py" in names and "p2pgrid/protocols/smpc/mac.py" in names
    assert not [n for n in names if n.startswith("protocols/")]
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    env = dict(os.environ, PYTHONPATH=str(site), P2PGRID_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-m", "p2pgrid", "demo"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mean birth weight at the hospital in February" in out.stdout and "Done" in out.stdout
