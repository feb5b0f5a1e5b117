"""A data owner's privacy ledger: what each published object has spent, and its cap.

Every round a peer trains on an object is a release of something computed from
it. The ledger records each release as a Rényi-DP curve (per order of
:data:`p2pgrid.protocols.dp.DEFAULT_ORDERS`) and composes them by addition, so the
epsilon spent can be read at any delta. A round protected both by client-level
DP (the coordinator's noise on the sum) and by per-example DP-SGD on this peer
costs the order-wise minimum of the two curves: each alone bounds the release.
A round without DP costs infinity: an object whose owner set a cap is never
released without DP, and setting a cap on an object already released without
DP closes it.

The owner sets caps per object or for the whole peer (``"*"``); the ledger lives
in ``<data_dir>/federated/privacy.cbor`` (CBOR, written atomically) and survives
restarts.

>>> import tempfile, pathlib
>>> led = PrivacyLedger(pathlib.Path(tempfile.mkdtemp()) / "privacy.cbor")
>>> led.set_cap(5.0, delta=1e-5)
>>> cost = round_cost({"client": {"noise_multiplier": 1.1, "delta": 1e-5}})
>>> token = led.charge(["obj"], cost)
>>> 0 < led.spent("obj", 1e-5) < 5.0
True
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Iterable

from p2pgrid.protocols.dp import DEFAULT_ORDERS, rdp_curve, rdp_to_epsilon
from p2pgrid.protocols.local_train import dp_steps

from .. import wire
from ..errors import BadRequest, PermissionDenied, register_error

__all__ = ["PrivacyLedger", "PrivacyBudgetExceeded", "round_cost"]

_FORMAT = "p2pgrid.federated.privacy/1"
ALL = "*"


@register_error
class PrivacyBudgetExceeded(PermissionDenied):
    """The data owner's epsilon cap for an object would be passed by one more release."""
    code = "federated_privacy_budget_exceeded"


def _num(d: dict, key: str, lo: float, hi: float) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(f"dp.{key} must be a number in [{lo}, {hi}]")
    return float(v)


def round_cost(cost: dict[str, Any] | None, *, num_examples: int = 0, batch_size: int = 1,
               epochs: int = 1, trust_client_dp: bool = True) -> list[float] | None:
    """The RDP curve of one round described by `cost`, or None when nothing bounds it.

    `cost` may hold ``"client"`` ({noise_multiplier}: client-level DP, counted only with
    `trust_client_dp`, at sample rate 1 whatever rate the coordinator claims: this peer
    cannot see how, nor how secretly, peers were sampled) and ``"local"``
    ({noise_multiplier}: per-example DP-SGD over `num_examples` with `batch_size` for
    `epochs`, sampled by this peer itself).
    """
    if not cost:
        return None
    if not isinstance(cost, dict):
        raise BadRequest("dp must be a map")
    curves = []
    client, local = cost.get("client"), cost.get("local")
    if client is not None and trust_client_dp:
        if not isinstance(client, dict):
            raise BadRequest("dp.client must be a map")
        curves.append(rdp_curve(_num(client, "noise_multiplier", 0, 1e6), 1.0))
    if local is not None:
        if not isinstance(local, dict):
            raise BadRequest("dp.local must be a map")
        if num_examples > 0:
            q, steps = dp_steps(num_examples, batch_size, epochs)
            curves.append(rdp_curve(_num(local, "noise_multiplier", 0, 1e6), q, steps))
    if not curves:
        return None
    return [min(values) for values in zip(*curves)]


class PrivacyLedger:
    """Caps and spending per object id, persisted at `path`. Thread-safe."""

    def __init__(self, path: Path, orders=DEFAULT_ORDERS):
        self.path = Path(path)
        self.orders = tuple(orders)
        self._lock = threading.Lock()
        self.caps: dict[str, dict[str, float]] = {}      # object id or "*" -> {"epsilon", "delta"}
        self.rdp: dict[str, list[float]] = {}            # object id -> composed RDP curve
        self.releases: dict[str, dict[str, int]] = {}    # object id -> {"private": n, "plain": n}
        self.trust_client_dp = True
        self._load()

    # ------------------------------------------------------------ persistence
    def _load(self) -> None:
        if not self.path.exists():
            return
        data = wire.loads(self.path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise BadRequest(f"{self.path} is not a privacy ledger")
        if list(data.get("orders", [])) != list(self.orders):
            raise BadRequest(f"{self.path} was written for other RDP orders")
        self.caps = {str(k): {"epsilon": float(v["epsilon"]), "delta": float(v["delta"])}
                     for k, v in data.get("caps", {}).items()}
        self.rdp = {str(k): [float(x) for x in v] for k, v in data.get("rdp", {}).items()}
        self.releases = {str(k): {"private": int(v.get("private", 0)), "plain": int(v.get("plain", 0))}
                         for k, v in data.get("releases", {}).items()}
        self.trust_client_dp = bool(data.get("trust_client_dp", True))

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(wire.dumps({"format": _FORMAT, "orders": list(self.orders), "caps": self.caps,
                                    "rdp": self.rdp, "releases": self.releases,
                                    "trust_client_dp": self.trust_client_dp}))
        tmp.replace(self.path)

    # ------------------------------------------------------------ caps
    def set_cap(self, epsilon: float | None, *, delta: float = 1e-5,
                objects: Iterable[str] | None = None, trust_client_dp: bool | None = None) -> None:
        """Cap `objects` (default: every object of this peer) at (epsilon, delta); None lifts it."""
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and epsilon >= 0):
            raise BadRequest("epsilon cap must be a number >= 0")
        if not 0 < delta < 1:
            raise BadRequest("delta must be in (0, 1)")
        with self._lock:
            for oid in (list(objects) if objects is not None else [ALL]):
                if epsilon is None:
                    self.caps.pop(oid, None)
                else:
                    self.caps[oid] = {"epsilon": float(epsilon), "delta": float(delta)}
            if trust_client_dp is not None:
                self.trust_client_dp = bool(trust_client_dp)
            self._save()

    def cap(self, oid: str) -> dict[str, float] | None:
        return self.caps.get(oid) or self.caps.get(ALL)

    # ------------------------------------------------------------ spending
    def _epsilon(self, curve: list[float] | None, plain: int, delta: float) -> float:
        if plain:
            return math.inf
        if curve is None:
            return 0.0
        return rdp_to_epsilon(self.orders, curve, delta)[0]

    def spent(self, oid: str, delta: float) -> float:
        """Epsilon `oid` has spent at `delta` (inf after a release without DP)."""
        return self._epsilon(self.rdp.get(oid), self.releases.get(oid, {}).get("plain", 0), delta)

    def _after(self, oid: str, curve: list[float] | None) -> tuple[list[float] | None, int]:
        old = self.rdp.get(oid)
        plain = self.releases.get(oid, {}).get("plain", 0) + (curve is None)
        if curve is None:
            return old, plain
        return ([a + b for a, b in zip(old, curve)] if old else list(curve)), plain

    def check(self, oids: Iterable[str], curve: list[float] | None) -> None:
        """PrivacyBudgetExceeded if one more release costing `curve` passes a cap."""
        with self._lock:
            self._check(list(oids), curve)

    def _check(self, oids: list[str], curve: list[float] | None) -> None:
        for oid in oids:
            cap = self.cap(oid)
            if cap is None:
                continue
            if curve is None:
                raise PrivacyBudgetExceeded(
                    f"object {oid} may only be trained on with differential privacy (its owner "
                    f"capped epsilon at {cap['epsilon']:g}); use dp=ClientDP(...) or LocalDP(...)",
                    id=oid, cap=cap["epsilon"])
            now = self.spent(oid, cap["delta"])
            after = self._epsilon(*self._after(oid, curve), cap["delta"])
            if after > cap["epsilon"]:
                raise PrivacyBudgetExceeded(
                    f"privacy budget of object {oid} exhausted: spent epsilon={now:.3g}, one more "
                    f"round would reach {after:.3g}, its owner's cap is {cap['epsilon']:g} "
                    f"(delta={cap['delta']:g})", id=oid, cap=cap["epsilon"], spent=now)

    def charge(self, oids: Iterable[str], curve: list[float] | None) -> tuple:
        """Check, then record one release on every object; returns a token for :meth:`refund`."""
        oids = list(dict.fromkeys(oids))
        with self._lock:
            self._check(oids, curve)
            for oid in oids:
                self.rdp[oid], plain = self._after(oid, curve)
                if self.rdp[oid] is None:
                    del self.rdp[oid]
                r = self.releases.setdefault(oid, {"private": 0, "plain": 0})
                r["plain"] = plain
                r["private"] += curve is not None
            self._save()
        return (tuple(oids), None if curve is None else tuple(curve))

    def refund(self, token: tuple) -> None:
        """Undo a :meth:`charge` whose release never left this peer."""
        oids, curve = token
        with self._lock:
            for oid in oids:
                r = self.releases.get(oid)
                if r is None:
                    continue
                if curve is None:
                    r["plain"] = max(0, r["plain"] - 1)
                else:
                    r["private"] = max(0, r["private"] - 1)
                    if oid in self.rdp:
                        self.rdp[oid] = [max(0.0, a - b) for a, b in zip(self.rdp[oid], curve)]
            self._save()

    def report(self, oids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """{object id: {"cap", "delta", "spent", "releases"}} for `oids` (default: all known)."""
        with self._lock:
            ids = list(oids) if oids is not None else sorted(set(self.rdp) | set(self.releases)
                                                              | (set(self.caps) - {ALL}))
            out = {}
            for oid in ids:
                cap = self.cap(oid)
                delta = cap["delta"] if cap else 1e-5
                out[oid] = {"cap": cap["epsilon"] if cap else None, "delta": delta,
                            "spent": self.spent(oid, delta),
                            "releases": dict(self.releases.get(oid, {"private": 0, "plain": 0}))}
            return out
