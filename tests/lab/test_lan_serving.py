"""Model serving between hosts: the company serves a model with one replica on the clinic's
host; the scientist's inference requests go on being answered after the company's host
is cut off mid-run (the replica answers them).

A cut cable gives no signal (no reset, no close): a request routed to the cut host fails
over only when its own timeout ends, so the scientist passes ``timeout=10``; with the
default (the peer's request timeout) one request waits that long before the replica gets it.
"""

import json
import subprocess
import textwrap
import time

import pytest

from p2pgrid.lab import Lab

pytestmark = pytest.mark.lab

MODEL = textwrap.dedent("""
    import torch
    from torch import nn
    from p2pgrid.serving import HostingPolicy, Policy

    POLICY = Policy(input_shape=(None, 1, 28, 28), dtype="float32", value_range=(0, 1),
                    max_batch=256, rate_limit="6000/min", users=["bob"])

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
""")

OWNER = MODEL + textwrap.dedent("""
    import os, trio, p2pgrid

    async def main():
        async with p2pgrid.connect("company", host=os.environ["LISTEN"], wait=30) as net:
            await net.wait_for_peers(["clinic"], timeout=60)
            await net.serve_model(model(), "digits", policy=POLICY, replicas=1)
            print("SERVING", flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")

SCIENTIST = MODEL + textwrap.dedent("""
    import json, os, sys, trio, p2pgrid

    async def main():
        async with p2pgrid.connect("bob", host=os.environ["LISTEN"], wait=30) as net:
            await net.set_hosting(HostingPolicy(accept_from=()))    # bob hosts no replica
            with trio.fail_after(120):
                while True:
                    hits = [i for i in net.models() if i.name == "digits"]
                    if hits and len(hits[0].hosts) >= 2:
                        break
                    await trio.sleep(0.1)
            print("HOSTS " + " ".join(sorted(hits[0].hosts.values())), flush=True)
            m, wrong, done = model(), 0, 0
            for i in range(40):
                if i == 10:
                    print("CUT", flush=True)
                    await trio.to_thread.run_sync(sys.stdin.readline)   # the test cuts the owner
                x = torch.rand(8, 1, 28, 28)
                with trio.fail_after(60):
                    y = await net.run_inference("digits", x, timeout=10)
                wrong += not torch.allclose(y, m(x), atol=1e-5)
                done += 1
            print(json.dumps({"done": done, "wrong": wrong}), flush=True)

    trio.run(main)
""")


def test_inference_goes_on_when_the_owners_host_is_cut_off(lab_required):
    with Lab(["company", "clinic", "bob"]) as lab:
        clinic = lab.spawn_peer("clinic", args=["--host", lab.address("clinic")])
        owner, owner_log = lab.spawn("company", ["python", "-c", OWNER], log="company",
                                     env={"LISTEN": lab.address("company")})
        lab.wait_up(clinic)
        bob = subprocess.Popen(lab.argv("bob", [lab.python, "-c", SCIENTIST]), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=lab.env("bob", {"LISTEN": lab.address("bob")}), start_new_session=True)
        try:
            lines = []
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                line = bob.stdout.readline()
                if not line:
                    break
                lines.append(line.strip())
                if line.startswith("CUT"):
                    lab.cut("company")
                    bob.stdin.write("go\n")
                    bob.stdin.flush()
                if line.startswith("{"):
                    break
            err = bob.stderr.read()[-6000:] if bob.poll() is not None else ""
            assert lines and lines[-1].startswith("{"), (lines, err, owner_log.read_text()[-2000:])
        finally:
            if bob.poll() is None:
                bob.kill()
            bob.wait(timeout=10)
            lab.stop(owner)
    assert "HOSTS clinic company" in lines
    assert json.loads(lines[-1]) == {"done": 40, "wrong": 0}
