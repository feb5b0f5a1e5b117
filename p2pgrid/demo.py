"""``p2pgrid demo``: a local network on embedded data, and the private-statistics walk-through."""

from __future__ import annotations

import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import trio

from .config import PeerConfig, load_profile
from .errors import PermissionDenied
from .testing import open_network

PROFILES = ("hospital", "clinic", "university", "company")


def _profile_path(name: str) -> Path:
    here = Path(__file__).resolve().parent.parent / "peers" / f"{name}.toml"
    if here.exists():
        return here
    return Path(str(resources.files("p2pgrid") / "profiles" / f"{name}.toml"))


def _say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo(args) -> int:
    with tempfile.TemporaryDirectory(prefix="p2pgrid-demo-") as tmp:
        root = Path(args.data_dir or tmp)
        configs = [load_profile(_profile_path(n), data_dir=root / n) for n in PROFILES]
        configs.append(PeerConfig(name="bob", data_dir=root / "bob"))
        t0 = time.perf_counter()
        async with open_network(configs, root, gossip_interval=0.3, ttl=10.0) as grid:
            _say(f"Started {len(configs)} peers on 127.0.0.1 in {time.perf_counter() - t0:.1f} s "
                 "(HTTP/2 over TLS pinned to each peer's Ed25519 key; gossip directory):")
            for name, peer in grid.peers.items():
                roles = ",".join(peer.config.roles)
                _say(f"  {name:<11} https://{peer.address}/  key {peer.key_id}  {roles}")
            await grid.wait_searchable("#birth-records")
            await walkthrough(grid.net("bob"))
            await smpc_walkthrough(grid.net("bob"))
            _say("\nDone: the hospital's rows never left the hospital.")
            if args.keep_running:
                _say("\nPeers keep running; open the pages above. Ctrl-C to stop.")
                await trio.sleep_forever()
    return 0


async def walkthrough(net) -> None:
    _say("\n1. bob searches the network by tag")
    _say("   hits = await net.search('#birth-records')")
    hits = await net.search("#birth-records")
    for peer, ptrs in sorted(hits.items()):
        for p in ptrs:
            _say(f"   {peer:<9} {p.id:<22} {str(tuple(p.shape)):<11} {p.description}")

    _say("\n2. tags combine: '#february #birth-records' means both")
    feb = await net.search("#february #birth-records")
    _say("   " + ", ".join(f"{peer}: {[p.id for p in ptrs]}" for peer, ptrs in sorted(feb.items())))

    rec = feb["hospital"][0]
    _say("\n3. a mean computed where the data lives (one round trip; only the number travels)")
    _say("   the hospital granted bob exact aggregates (aggregate = [\"bob\", ...] in its rules)")
    _say("   avg = await (rec[:, 0].sum() / rec.shape[0]).get()")
    avg = await (rec[:, 0].sum() / rec.shape[0]).get()
    _say(f"   mean birth weight at the hospital in February: {float(avg):.3f} kg")
    stats = await rec.mean(dim=0).get()
    _say(f"   column means (weight kg, length cm, weeks): {[round(v, 2) for v in stats.tolist()]}")

    _say("\n4. raw rows never leave")
    _say("   await rec.get()")
    try:
        await rec.get()
        _say("   !! the rows were downloaded: the rules are not enforced")
    except PermissionDenied as e:
        _say(f"   PermissionDenied: {e}")

    _say("\n5. nor do row-level results, or sums that single out records")
    onehot = torch.zeros(rec.shape[0])
    onehot[0] = 1
    for label, expr in (("(rec[:, 0] * 2).get()", rec[:, 0] * 2),
                        ("(rec[:, 0] * onehot).sum().get()", (rec[:, 0] * onehot).sum()),
                        ("(rec[:, 0] * (rec[:, 2] > 42)).sum().get()  # a mask from the data",
                         (rec[:, 0] * (rec[:, 2] > 42)).sum()),
                        ("rec[:5, 0].sum().get()  # five records", rec[:5, 0].sum())):
        try:
            await expr.get()
            _say(f"   {label}: allowed (!)")
        except PermissionDenied:
            _say(f"   {label}: PermissionDenied")

    _say("\n6. a pooled statistic across peers: exact where granted, differentially private")
    _say("   elsewhere (the clinic grants compute only: p.sum().get(epsilon=0.5) is charged to")
    _say("   bob's default privacy budget there, within the bounds the clinic declared)")
    total_w, total_n = 0.0, 0
    for peer, ptrs in sorted(feb.items()):
        p = ptrs[0]
        try:
            s, how = float(await p[:, 0].sum().get()), "exact"
        except PermissionDenied:
            s, how = float(await p[:, 0].sum().get(epsilon=0.5)), "DP, epsilon=0.5"
        total_w, total_n = total_w + s, total_n + p.shape[0]
        _say(f"   {peer:<9} sum of weights over {p.shape[0]} births: {s:.1f} ({how})")
    _say(f"   pooled February mean weight: {total_w / total_n:.3f} kg over {total_n} births")

    _say("\n7. results can stay remote as pointers, and bob can send his own tensors")
    bmi = await (rec[:, 0] / (rec[:, 1] / 100) ** 2)
    _say(f"   BMI-like result kept on hospital: {bmi!r}")
    try:
        await bmi.mean().get()
        _say("   its exact mean: allowed (!)")
    except PermissionDenied:
        _say("   its exact mean: PermissionDenied (it combines two columns of each record)")
    dp = await (rec[:, 0] / (rec[:, 1] / 100).square()).mean().get(epsilon=0.2)
    _say(f"   its mean as a DP release (epsilon=0.2): {float(dp):.2f} kg/m^2")
    mine = await net.peer("clinic").send(torch.tensor([1.0, 2.0, 3.0]), tags=["bob-scratch"])
    _say(f"   sent to clinic: {mine!r} -> back: {(await (mine * 10).get()).tolist()}")
    await mine.delete()


async def smpc_walkthrough(net) -> None:
    """Secret sharing, where the data's owner decides who holds the shares."""
    rec = (await net.search("#february #birth-records"))["hospital"][0]
    _say("\n8. secret sharing: the hospital's peer decides who may hold shares of its data")
    _say("   x = await rec.share('hospital', 'clinic', dealer='university')")
    x = await rec.share("hospital", "clinic", dealer="university")
    _say(f"   {x!r}  (peers/hospital.toml: smpc_parties, crypto_providers)")
    try:
        await x.reveal()
        _say("   !! bob reconstructed the rows")
    except PermissionDenied:
        _say("   x.reveal(): PermissionDenied (the shares keep the data's rules)")
    await x.delete()
    for parties, dealer in ((("clinic", "company"), "university"), (("hospital", "clinic"), "company")):
        try:
            await rec.share(*parties, dealer=dealer)
            _say(f"   share among {parties}, {dealer} dealing: allowed (!)")
        except PermissionDenied as e:
            _say(f"   share among {parties}, {dealer} dealing: PermissionDenied: {e}")
