"""Encrypted training and inference between hosts: two data owners who hold the shares,
the university as crypto provider (started from its profile) and the company that
coordinates, each a process in its own namespace; results match plaintext."""

import json
import textwrap

import pytest

from p2pgrid.lab import Lab

pytestmark = pytest.mark.lab

DATA = textwrap.dedent("""
    import torch
    def data():
        g = torch.Generator().manual_seed(3)        # the test's data, not privacy randomness
        x = torch.randn(64, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.25]]) + 0.3
        return x, y
""")

OWNER = DATA + textwrap.dedent("""
    import os, trio, p2pgrid

    async def main():
        name = os.environ["NAME"]
        rows = slice(0, 32) if name == "hospital" else slice(32, 64)
        x, y = data()
        other = "clinic" if name == "hospital" else "hospital"
        # the owner's own peer decides who may hold shares of its data and who deals
        async with p2pgrid.connect(name, host=os.environ["LISTEN"], wait=30, smpc_parties=(other,),
                                   crypto_providers=("university",)) as net:
            # aggregates (the loss) are an explicit grant
            await net.publish(x[rows], tags=[f"{name}-x"], compute=["company"], aggregate=["company"])
            await net.publish(y[rows], tags=[f"{name}-y"], compute=["company"], aggregate=["company"])
            print("READY", flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")

COMPANY = DATA + textwrap.dedent("""
    import json, os, torch, trio, p2pgrid
    from torch import nn
    from p2pgrid import smpc

    PARTIES = ["hospital", "clinic"]

    async def main():
        x, y = data()
        async with p2pgrid.connect("company", host=os.environ["LISTEN"], wait=30) as net:
            await net.wait_for_peers(["hospital", "clinic", "university"], timeout=90)
            shared = {}
            for tag in ("hospital-x", "hospital-y", "clinic-x", "clinic-y"):
                hits = await net.search("#" + tag, wait=60)
                (ptr,) = [p for ps in hits.values() for p in ps]
                shared[tag] = await ptr.share(*PARTIES, dealer="university")
            xs = smpc.cat([shared["hospital-x"], shared["clinic-x"]])
            ys = smpc.cat([shared["hospital-y"], shared["clinic-y"]])
            torch.manual_seed(1)
            plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).double()
            model = await net.encrypt_model(plain, parties=PARTIES, dealer="university",
                                            requires_grad=True)
            opt = smpc.SGD(model, lr=0.05)
            ref_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
            losses, ref = [], []
            async for xb, yb in smpc.PrivateLoader(xs, ys, batch_size=16):
                losses.append(await model.fit_batch(xb, yb, loss="mse", optimizer=opt))
            for step in range(4):
                rows = slice(16 * step, 16 * step + 16)
                ref_opt.zero_grad()
                loss = ((plain(x[rows].double()) - y[rows].double()) ** 2).mean()
                loss.backward()
                ref_opt.step()
                ref.append(loss.item())
            model.requires_grad = False
            probe = torch.randn(8, 4, dtype=torch.float64)
            enc = await model.predict(probe)
            want = plain(probe).detach()
            print(json.dumps({"losses": losses, "ref": ref,
                              "inference_err": float((enc - want).abs().max())}), flush=True)

    trio.run(main)
""")


def test_encrypted_training_and_inference_across_four_hosts_match_plaintext(lab_required):
    with Lab(["hospital", "clinic", "university", "company"]) as lab:
        university = lab.spawn_peer("university", profile="peers/university.toml",
                                    args=["--host", lab.address("university")])
        owners = [lab.spawn(n, ["python", "-c", OWNER], log=n,
                            env={"NAME": n, "LISTEN": lab.address(n)})[0] for n in ("hospital", "clinic")]
        try:
            lab.wait_up(university)
            r = lab.run("company", ["python", "-c", COMPANY], timeout=300,
                        env={"LISTEN": lab.address("company")})
        finally:
            for p in owners:
                lab.stop(p)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(out["losses"], out["ref"])) < 1e-2
    assert out["inference_err"] < 1e-2
