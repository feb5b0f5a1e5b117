#!/usr/bin/env python3
"""Benchmark model serving over real peers; prints one JSON object.

Peers run in separate processes (real TLS HTTP/2 on loopback):

* ``owner``: serves a small MLP (private: remote inference only) and a GPT-2-small-sized
  model (124 M parameters, about 500 MB float32, random weights);
* ``replica``: hosts a replica of the big model (the upload);
* ``downloader``: downloads the big model (the download);
* ``hospital``, ``clinic`` (parties) and ``university`` (crypto provider): encrypted
  serving of the MLP through p2pgrid.smpc;
* this process: a client running private inference at concurrency 1, 8 and 64, and
  encrypted inference at batch 1 and 64.

Peak RSS of each process is measured with /proc/self/status (VmHWM, reset through
/proc/self/clear_refs before each phase) and getrusage; "baseline" is the process's RSS
before the phase (python, torch, the running peer, and for the owner the model itself).

    python scripts/bench_serving.py                  # everything (a few minutes on 2 cores)
    python scripts/bench_serving.py --skip-big       # inference only
    unshare -n sh -c 'ip link set lo up; python scripts/bench_serving.py'   # no outside network
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

MB = 1e6
NET = dict(ttl=60.0, gossip_interval=0.5)  # records must not expire on a busy machine


# ------------------------------------------------------------------ memory

def memory() -> dict:
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                status[k] = int(v.split()[0]) * 1024 / MB
    return {"peak_mb": round(status["VmHWM"], 1), "rss_mb": round(status["VmRSS"], 1),
            "lifetime_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, 1)}


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ child processes

def mlp():
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


async def child(role: str, data_dir: str, join: list[str], roles: list[str]) -> None:
    import torch

    from p2pgrid.network import connect
    from p2pgrid.serving import Policy
    from p2pgrid.serving.gpt import GPT

    torch.set_num_threads(1)
    state: dict = {}
    # load the code paths of export and import (FX, meta-device layers) before measuring:
    # about 70 MB of lazily imported torch modules, paid once per process, not per model
    from p2pgrid.modelgraph import export_model, import_model
    import_model(export_model(GPT(vocab=8, context=4, width=8, depth=1, heads=2)))
    async with connect(role, join=join, data_dir=data_dir, mdns=False, wait=10.0, listen=True,
                       roles=tuple(roles), **NET) as net:
        print(json.dumps({"ready": f"{net.me.key_id}@{net.me.address}", **memory()}), flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line.strip():
                return
            cmd, *args = line.split()
            t0 = time.perf_counter()
            out: dict = {}
            if cmd == "rss":
                pass
            elif cmd == "reset":
                out["reset"] = reset_peak()
            elif cmd == "serve_mlp":
                await net.serve_model(mlp(), "mlp", policy=Policy(
                    input_shape=(None, 1, 28, 28), dtype="float32", value_range=(0, 1),
                    max_batch=256, rate_limit="1000000/min", users=["client"]))
            elif cmd == "wait_peers":
                with trio.fail_after(60):
                    await net.wait_for_peers(args)
            elif cmd == "serve_mpc":
                with trio.fail_after(60):  # the parties and the dealer are in the directory
                    await net.wait_for_peers(["hospital", "clinic", "university"])
                await net.serve_model(mlp(), "mlp-encrypted", mpc=True, parties=["hospital", "clinic"],
                                      dealer="university", policy=Policy(
                                          input_shape=(None, 1, 28, 28), dtype="float32",
                                          value_range=(0, 1), users=["client"]))
            elif cmd == "build_big":
                torch.manual_seed(0)
                state["big"] = GPT.small().eval()
                out["params"] = sum(p.numel() for p in state["big"].parameters())
            elif cmd == "serve_big":
                info = await net.serve_model(state["big"], "gpt2-small", allow_download=True,
                                             allow_remote_inference=True)
                out.update(size=info.size, hash=info.hash)
            elif cmd == "replicate":
                [report] = await net.replicate_model("gpt2-small", hosts=[args[0]])
                out["report"] = vars(report)
            elif cmd == "wait_model":
                with trio.fail_after(60):
                    while not [i for i in net.models() if i.name == args[0]]:
                        await trio.sleep(0.1)
            elif cmd == "download":
                model = await net.download_model(args[0])
                report = net._serving().last_download
                out["report"] = vars(report)
                out["params"] = sum(p.numel() for p in model.parameters())
                del model
            out["seconds"] = round(time.perf_counter() - t0, 3)
            out.update(memory())
            print(json.dumps(out), flush=True)


class Child:
    def __init__(self, role: str, root: Path, join: list[str], roles: tuple[str, ...] = ()):
        cmd = [sys.executable, __file__, "--child", role, "--data-dir", str(root / role)]
        for j in join:
            cmd += ["--join", j]
        for r in roles:
            cmd += ["--role", r]
        self.role = role
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.role} exited ({self.proc.wait()})")
        return json.loads(line)

    def __call__(self, *cmd: str) -> dict:
        self.proc.stdin.write(" ".join(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


# ------------------------------------------------------------------ inference bench

async def inference_bench(seed: str, root: Path, counts: dict[int, int]) -> dict:
    import torch

    from p2pgrid.network import connect

    out = {}
    async with connect("client", join=[seed], data_dir=root / "client", mdns=False, wait=10.0,
                       **NET) as net:
        with trio.fail_after(30):
            while not [i for i in net.models() if i.name == "mlp"]:
                await trio.sleep(0.05)
        x = torch.rand(1, 1, 28, 28)
        want = mlp()(x)
        for _ in range(20):  # warm up: connection, caches
            y = await net.run_inference("mlp", x)
        assert torch.allclose(y, want, atol=1e-6)
        for conc, total in counts.items():
            lat: list[float] = []
            todo = iter(range(total))

            async def worker():
                for _ in todo:
                    t = time.perf_counter()
                    await net.run_inference("mlp", x)
                    lat.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            async with trio.open_nursery() as n:
                for _ in range(conc):
                    n.start_soon(worker)
            wall = time.perf_counter() - t0
            lat.sort()
            out[f"concurrency_{conc}"] = {
                "requests": total, "p50_ms": round(statistics.median(lat) * 1e3, 2),
                "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, 2),
                "requests_per_s": round(total / wall, 1)}
    return out


async def encrypted_bench(seed: str, root: Path) -> dict:
    """Per-image time of encrypted inference (2 parties + a dealer, separate processes)."""
    import torch

    from p2pgrid.network import connect

    out = {"parties": ["hospital", "clinic"], "dealer": "university", "frac_bits": 16}
    # the client's peer shares its inputs only among parties and a dealer it trusts
    async with connect("client", join=[seed], data_dir=root / "client", mdns=False, wait=10.0,
                       smpc_parties=("hospital", "clinic"), crypto_providers=("university",),
                       **NET) as net:
        with trio.fail_after(60):
            await net.wait_for_peers(["owner", "hospital", "clinic", "university"])
            while not [i for i in net.models() if i.name == "mlp-encrypted"] or \
                    "smpc-models" not in net.me.record("owner").services:
                await trio.sleep(0.1)
        plain = mlp()
        for batch, reps in ((1, 5), (64, 2)):
            x = torch.rand(batch, 1, 28, 28)
            y = await net.run_encrypted_inference("mlp-encrypted", x)  # warm-up
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                y = await net.run_encrypted_inference("mlp-encrypted", x)
                times.append(time.perf_counter() - t)
            with torch.no_grad():
                err = float((y - plain(x)).abs().max())
            best = min(times)
            out[f"batch_{batch}"] = {"seconds_per_call": round(best, 3),
                                     "ms_per_image": round(best / batch * 1e3, 2),
                                     "max_abs_error_vs_plaintext": round(err, 5),
                                     "calls": reps}
    return out


# ------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--data-dir")
    ap.add_argument("--join", action="append", default=[])
    ap.add_argument("--role", action="append", default=[])
    ap.add_argument("--skip-big", action="store_true", help="inference only")
    ap.add_argument("--skip-inference", action="store_true", help="large-model transfers only")
    ap.add_argument("--skip-encrypted", action="store_true", help="no encrypted inference")
    ap.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    args = ap.parse_args()
    if args.child:
        trio.run(child, args.child, args.data_dir, args.join, args.role)
        return 0

    result: dict = {"host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        owner = Child("owner", root, [])
        seed = owner.hello["ready"]
        others: list[Child] = []
        try:
            if not args.skip_inference:
                owner("serve_mlp")
                n = args.requests
                result["private_inference_mlp_784_128_10"] = trio.run(
                    inference_bench, seed, root, {1: n, 8: n, 64: max(n, 640)})
            if not args.skip_encrypted:
                for name, roles in (("hospital", ()), ("clinic", ()),
                                    ("university", ("crypto-provider",))):
                    others.append(Child(name, root, [seed], roles))
                for c in others:  # every party knows the others and the dealer
                    c("wait_peers", *[o.role for o in others if o is not c], "owner")
                owner("serve_mpc")
                result["encrypted_inference_mlp_784_128_10"] = trio.run(encrypted_bench, seed, root)
                for c in others:
                    c.close()
                others.clear()
            if not args.skip_big:
                result["large_model"] = big_bench(owner, root, seed, others)
        finally:
            for c in [owner, *others]:
                c.close()
    print(json.dumps(result, indent=2))
    return 0


def big_bench(owner: Child, root: Path, seed: str, others: list) -> dict:
    out: dict = {}
    base = owner("rss")
    built = owner("build_big")
    out["params"] = built["params"]
    owner("reset")
    served = owner("serve_big")  # writes the package (streamed from the live tensors)
    size_mb = served["size"] / MB
    out["package_mb"] = round(size_mb, 1)
    out["owner_serve"] = {"seconds": served["seconds"], "rss_before_mb": built["rss_mb"],
                          "peak_mb": served["peak_mb"]}

    replica = Child("replica", root, [seed])
    others.append(replica)
    replica("wait_model", "gpt2-small")
    owner("reset")
    replica("reset")
    r_base = replica("rss")
    up = owner("replicate", "replica")
    r_after = replica("rss")
    rep = up["report"]
    out["upload"] = {
        "seconds_total": round(rep["seconds"], 2), "seconds_chunks": round(rep["chunk_seconds"], 2),
        "mb_per_s_chunks": round(size_mb / rep["chunk_seconds"], 1),
        "mb_per_s_total": round(size_mb / rep["seconds"], 1), "chunks": rep["chunks"],
        "sender": _mem(built["rss_mb"], up["peak_mb"], size_mb),
        "receiver": _mem(r_base["rss_mb"], r_after["peak_mb"], size_mb),
    }
    replica.close()
    others.remove(replica)

    down = Child("downloader", root, [seed])
    others.append(down)
    down("wait_model", "gpt2-small")
    owner("reset")
    down("reset")
    d_base = down("rss")
    got = down("download", "gpt2-small")
    o_after = owner("rss")
    rep = got["report"]
    out["download"] = {
        "seconds_total": round(rep["seconds"], 2), "seconds_chunks": round(rep["chunk_seconds"], 2),
        "mb_per_s_chunks": round(size_mb / rep["chunk_seconds"], 1),
        "mb_per_s_total": round(size_mb / rep["seconds"], 1), "params": got["params"],
        "sender": _mem(built["rss_mb"], o_after["peak_mb"], size_mb),
        "receiver": _mem(d_base["rss_mb"], got["peak_mb"], size_mb),
    }
    out["owner_baseline_rss_mb_before_model"] = base["rss_mb"]
    return out


def _mem(before: float, peak: float, size_mb: float) -> dict:
    return {"rss_before_mb": before, "peak_mb": peak, "peak_over_before_mb": round(peak - before, 1),
            "budget_mb": round(size_mb + 256, 1), "peak_within_model_plus_256mb": peak <= size_mb + 256}


if __name__ == "__main__":
    sys.exit(main())
