"""A non-editable install in a fresh venv works away from the repository: `python -m p2pgrid
demo` finds its profiles as package data."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_runs_demo_outside_the_repository(tmp_path):
    # built from a copy: pip builds in the source tree, and a build/ left there by an
    # earlier build would both leak stale files into the wheel and be left behind
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("p2pgrid-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "p2pgrid/profiles/hospital.toml" in names and "p2pgrid/py.typed" in names
    assert "p2pgrid/console/templates/owner.html" in names
    # the repository's protocols/ installs under p2pgrid, never as a top-level package
    assert "p2pgrid/protocols/__init__.py" in names and "p2pgrid/protocols/smpc/mac.py" in names
    assert not [n for n in names if n.startswith("protocols/")]
    # a fresh venv, the wheel installed into it (not editable); its dependencies come from
    # this environment's site-packages by a plain path entry, so no download is needed and
    # this checkout's editable hook (a .pth there) is not run: p2pgrid is the wheel's
    fresh = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    python = fresh / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, timeout=60).stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (fresh_site / "zz-deps.pth").write_text("\n".join(deps) + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                           str(fresh_site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["P2PGRID_HOME"] = str(tmp_path / "home")
    where = subprocess.run([str(python), "-c", "import p2pgrid, p2pgrid.protocols; print(p2pgrid.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(fresh_site), where.stdout   # not this checkout
    out = subprocess.run([str(python), "-m", "p2pgrid", "demo"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mean birth weight at the hospital in February" in out.stdout and "Done" in out.stdout
