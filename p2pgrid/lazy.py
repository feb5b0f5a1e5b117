"""Names a package exports but loads on first use (PEP 562).

``p2pgrid --help`` imports the package and its plugins for their command lines; it
must not pay for torch and the network stack, which most exported names pull in.

>>> import types
>>> mod = types.ModuleType("demo")
>>> mod.__getattr__, mod.__dir__ = lazy_exports(mod, {"dumps": "json"})
>>> mod.__getattr__("dumps")({"a": 1})
'{"a": 1}'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any, Callable


def lazy_exports(module: ModuleType | dict, table: dict[str, str], *,
                 submodules: bool = False) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` for `module` (a module or its
    ``globals()``): each name in `table` comes from the module path it maps to (relative
    to `module`), imported once and then kept as an ordinary attribute. With
    `submodules`, any other public name that is a submodule is imported as such."""
    namespace = module if isinstance(module, dict) else vars(module)
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            namespace[name] = value
            return value
        if submodules and not name.startswith("_") \
                and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
