"""Capabilities every peer runs, each in its own module.

A plugin module may define:
- ``router``: a :class:`p2pgrid.router.Router` with its request handlers;
- ``async def service(peer, task_status)``: a long-running task the peer's nursery
  owns (call ``task_status.started()`` once ready);
- ``class NetworkAPI``: a mixin of methods for :class:`p2pgrid.network.Network`;
- a ``cli`` submodule with ``def add_cli(subparsers) -> dict[str, Callable]``: add ``p2pgrid``
  subcommands (argparse) and return {command name: ``async def run(args) -> int``}. Building
  the parser imports only these submodules (and the package's ``__init__``, so keep that
  free of torch and the network stack): ``p2pgrid --help`` must not load them.

Every peer loads the same list, so every participant runs the same actor.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

PLUGINS = (
    "p2pgrid.smpc",        # secret sharing sessions, remote dealer (issue 3)
    "p2pgrid.federated",   # federated learning (issue 4)
    "p2pgrid.serving",     # model serving (issue 5)
    "p2pgrid.governance",  # users, requests, privacy budgets, audit (issue 6)
)


def modules() -> list[ModuleType]:
    out = []
    for name in PLUGINS:
        if importlib.util.find_spec(name) is None:
            continue  # not built yet
        out.append(importlib.import_module(name))
    return out


def routers():
    return [m.router for m in modules() if hasattr(m, "router")]


def services():
    return [m.service for m in modules() if hasattr(m, "service")]


def network_mixins() -> tuple[type, ...]:
    return tuple(m.NetworkAPI for m in modules() if hasattr(m, "NetworkAPI"))


def cli_extensions(subparsers) -> dict:
    runners = {}
    for name in PLUGINS:
        # find_spec of "pkg.cli" would import pkg; look for the file without importing it
        spec = importlib.util.find_spec(name)
        if spec is None or not any(Path(d, "cli.py").is_file()
                                   for d in spec.submodule_search_locations or ()):
            continue
        runners.update(importlib.import_module(f"{name}.cli").add_cli(subparsers))
    return runners
