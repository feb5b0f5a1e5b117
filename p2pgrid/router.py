"""Handlers keyed by message type: the only way a request reaches code.

>>> from p2pgrid.messages import Ping, Pong
>>> r = Router()
>>> @r.on(Ping)
... async def ping(peer, caller, msg):
...     return Pong("me", "k", 0.0)
>>> Ping in r
True
"""

from __future__ import annotations

from typing import Awaitable, Callable

from .errors import BadRequest

Handler = Callable[..., Awaitable[object]]


class Router:
    def __init__(self) -> None:
        self._handlers: dict[type, Handler] = {}

    def on(self, msg_type: type):
        def deco(fn: Handler) -> Handler:
            if msg_type in self._handlers:
                raise ValueError(f"{msg_type.__name__} already has a handler")
            self._handlers[msg_type] = fn
            return fn
        return deco

    def include(self, other: "Router") -> None:
        for t, fn in other._handlers.items():
            if t in self._handlers and self._handlers[t] is not fn:
                raise ValueError(f"{t.__name__} already has a handler")
            self._handlers[t] = fn

    def __contains__(self, msg_type: type) -> bool:
        return msg_type in self._handlers

    async def dispatch(self, peer, caller, msg):
        fn = self._handlers.get(type(msg))
        if fn is None:
            raise BadRequest(f"this peer does not handle {type(msg).__name__} requests")
        return await fn(peer, caller, msg)
