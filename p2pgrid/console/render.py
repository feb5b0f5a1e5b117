"""The console's Jinja2 environment: templates shipped as package data, autoescaped."""

from __future__ import annotations

from functools import lru_cache

from . import views


@lru_cache(maxsize=1)
def environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape on for every template (.html and the included .css alike): a dataset
    # name, tag or audit detail is text, never markup
    env = Environment(loader=PackageLoader("p2pgrid.console", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = views.num
    env.filters["names"] = views.names
    return env


def render(template: str, context: dict) -> str:
    """`template` filled with `context` (call from a worker thread: it may take a while)."""
    return environment().get_template(template).render(**context)
