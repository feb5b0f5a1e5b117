"""Which replica gets the next request: the one expected to answer first (sans-IO).

Each (host, model) pair keeps the number of requests in flight and a moving average
of its latency; a request goes to the host with the least ``latency * (in flight + 1)``,
i.e. the shortest expected wait if requests queue there. Hosts never measured count
as fast as the fastest known one, so they get tried. A host that failed is avoided
for ``cooldown`` seconds, unless every host has failed.

>>> t = [0.0]
>>> r = Routes(clock=lambda: t[0])
>>> a = r.start("a", "m"); r.done(a, ok=True, elapsed=0.010)
>>> b = r.start("b", "m"); r.done(b, ok=True, elapsed=0.002)
>>> r.pick(["a", "b"], "m")
'b'
>>> held = [r.start("b", "m") for _ in range(5)]  # b is busy now
>>> r.pick(["a", "b"], "m")
'a'
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = ["Routes", "Ticket"]

DEFAULT_LATENCY = 0.005


@dataclass
class _Stat:
    inflight: int = 0
    latency: float | None = None  # exponential moving average, seconds
    calls: int = 0
    failures: int = 0


@dataclass(frozen=True)
class Ticket:
    host: str
    model: str
    started: float


@dataclass
class Routes:
    clock: Callable[[], float] = time.monotonic
    alpha: float = 0.3        # weight of the newest latency sample
    cooldown: float = 5.0     # seconds a failed host is passed over
    _stats: dict[tuple[str, str], _Stat] = field(default_factory=dict)
    _down_until: dict[str, float] = field(default_factory=dict)

    def _stat(self, host: str, model: str) -> _Stat:
        return self._stats.setdefault((host, model), _Stat())

    def pick(self, hosts: Sequence[str], model: str) -> str:
        """The host expected to answer first; `hosts` must not be empty."""
        if not hosts:
            raise ValueError("no hosts to pick from")
        now = self.clock()
        up = [h for h in hosts if self._down_until.get(h, 0.0) <= now] or list(hosts)
        known = [s.latency for h in up if (s := self._stats.get((h, model))) and s.latency is not None]
        default = min(known) if known else DEFAULT_LATENCY

        def cost(h: str):
            s = self._stats.get((h, model)) or _Stat()
            lat = default if s.latency is None else s.latency
            return (lat * (s.inflight + 1), s.inflight, h)

        return min(up, key=cost)

    def start(self, host: str, model: str) -> Ticket:
        self._stat(host, model).inflight += 1
        return Ticket(host, model, self.clock())

    def done(self, ticket: Ticket, *, ok: bool, elapsed: float | None = None,
             measure: bool = True) -> None:
        """End a request. ``ok=False``: the host did not answer (down, unreachable);
        ``measure=False``: it answered, but not with a sample of its latency (a refusal)."""
        s = self._stat(ticket.host, ticket.model)
        s.inflight = max(0, s.inflight - 1)
        if ok:
            if measure:
                dt = self.clock() - ticket.started if elapsed is None else elapsed
                s.latency = dt if s.latency is None else (1 - self.alpha) * s.latency + self.alpha * dt
            s.calls += 1
            self._down_until.pop(ticket.host, None)
        else:
            s.failures += 1
            self._down_until[ticket.host] = self.clock() + self.cooldown

    def snapshot(self) -> dict[str, dict]:
        """host/model -> in flight, latency (ms), calls, failures: for status pages and tests."""
        return {f"{h}/{m}": {"inflight": s.inflight, "calls": s.calls, "failures": s.failures,
                             "latency_ms": None if s.latency is None else round(s.latency * 1e3, 3)}
                for (h, m), s in self._stats.items()}
