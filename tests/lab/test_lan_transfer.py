"""A 256 MB tensor between hosts whose links are limited to 1 Gbit/s arrives whole (streamed
in chunks, TLS, through the rate limiter; test_lab_network checks the limiter itself)."""

import json
import textwrap

import pytest

from p2pgrid.lab import Lab, LinkSpec

pytestmark = pytest.mark.lab

SENDER = textwrap.dedent("""
    import json, os, time, torch, trio, p2pgrid

    async def main():
        n = 64 * 1024 * 1024                       # 64 Mi int32 = 256 MiB
        x = torch.arange(n, dtype=torch.int32)
        async with p2pgrid.connect("bob", host=os.environ["LISTEN"], wait=30) as net:
            await net.wait_for_peers(["store"], timeout=60)
            t0 = time.perf_counter()
            with trio.fail_after(240):
                ptr = await net.peer("store").send(x)
            elapsed = time.perf_counter() - t0
            tail = await ptr[n - 3:].get()
            print(json.dumps({"s": elapsed, "shape": list(ptr.shape), "tail": tail.tolist()}), flush=True)

    trio.run(main)
""")


def test_a_256_mb_tensor_crosses_1_gbit_links(lab_required):
    with Lab(["store", "bob"], LinkSpec.parse(rate="1gbit")) as lab:
        lab.start_peer("store", args=["--host", lab.address("store")])
        # its owner lets others store objects (the default is registered users only)
        lab.run("store", ["p2pgrid", "users", "storage", "anyone", "--peer", "store"], check=True)
        r = lab.run("bob", ["python", "-c", SENDER], timeout=400, env={"LISTEN": lab.address("bob")})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    n = 64 * 1024 * 1024
    assert out["shape"] == [n]
    assert out["tail"] == [n - 3, n - 2, n - 1]
    assert out["s"] >= 0.95 * (n * 4 * 8 / 1e9)     # 2.1 s at 1 Gbit/s: never faster
