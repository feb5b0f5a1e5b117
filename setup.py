"""Ship peers/*.toml as package data (p2pgrid/profiles/), so an installed ``p2pgrid demo``
finds its profiles; the repository keeps them in peers/. The repository's top-level
protocols/ folder installs as ``p2pgrid.protocols`` (never as a top-level ``protocols``).
Builds the optional C kernels of active SMPC (protocols/smpc/_ring128.c). Everything else
is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py


class build_py_with_profiles(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "p2pgrid" / "profiles"
        dest.mkdir(parents=True, exist_ok=True)
        for toml in sorted(Path(__file__).resolve().parent.joinpath("peers").glob("*.toml")):
            shutil.copy2(toml, dest / toml.name)


ROOT = Path(__file__).resolve().parent
PACKAGES = find_packages(str(ROOT), include=["p2pgrid", "p2pgrid.*"]) + [
    f"p2pgrid.{name}" for name in find_packages(str(ROOT), include=["protocols", "protocols.*"])]
# the console's templates: data, but setuptools warns at every install unless their folder
# is listed as a package of its own
PACKAGES.append("p2pgrid.console.templates")

# Active SMPC's Z_2^128 kernels in C. Optional: without a C compiler the install goes on
# and ring128.py runs its numpy code (several times slower for active sessions).
RING128 = Extension("p2pgrid.protocols.smpc._ring128", ["protocols/smpc/_ring128.c"],
                    extra_compile_args=["-O3"], optional=True)

setup(cmdclass={"build_py": build_py_with_profiles}, packages=PACKAGES,
      package_dir={"p2pgrid.protocols": "protocols"}, ext_modules=[RING128])
