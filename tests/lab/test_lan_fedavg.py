"""Federated averaging between hosts: three data peers and a coordinator, each a process
in its own namespace; one data host's link is cut during round 2, and training goes on
with the others (the round closes at its timeout with the updates it got)."""

import json
import subprocess
import textwrap
import time

import pytest

from p2pgrid.lab import Lab

pytestmark = pytest.mark.lab

OWNER = textwrap.dedent("""
    import os, sys, torch, trio, p2pgrid

    async def main():
        shard = int(sys.argv[1])
        g = torch.Generator().manual_seed(100 + shard)   # the shard's data, not privacy randomness
        x = torch.randn(240, 8, generator=g)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
        async with p2pgrid.connect(os.environ["NAME"], host=os.environ["LISTEN"], wait=30) as net:
            await net.federated_publish(x, y, tags=["lab", "train"], compute=["ai"],
                                        description=f"shard {shard}")
            print("READY", flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")

COORDINATOR = textwrap.dedent("""
    import json, os, torch, trio, p2pgrid
    from torch import nn
    from p2pgrid.federated import SGD, FedAvg
    from p2pgrid.federated.data import find_shards

    async def main():
        async with p2pgrid.connect("ai", host=os.environ["LISTEN"], wait=30) as net:
            with trio.fail_after(90):
                while len(find_shards(net.me.directory, "#lab #train")) < 3:
                    await trio.sleep(0.2)
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

            def on_event(ev):
                if ev.kind in ("round_start", "round_end"):
                    print(f"EVENT {ev.kind} {ev.round}", flush=True)
                    if ev.kind == "round_start" and ev.round == 2:
                        input()   # the test cuts a link, then says go

            result = await net.federated_fit(
                model, "#lab #train", rounds=3, local_epochs=2, batch_size=32,
                optimizer=SGD(lr=0.1), strategy=FedAvg(min_peers=2, round_timeout=10),
                progress=False, on_event=on_event, discover_timeout=5)
            x = torch.randn(500, 8)
            acc = (result.model(x).argmax(1) == (x[:, 0] + 0.5 * x[:, 1] > 0).long()).float().mean()
            print(json.dumps({"rounds": [{"round": h.round, "peers": sorted(h.peers),
                                          "failures": sorted(h.failures)} for h in result.history],
                              "accuracy": float(acc)}), flush=True)

    trio.run(main)
""")


def test_fedavg_goes_on_when_a_data_hosts_link_is_cut_in_round_2(lab_required):
    hosts = ["ai", "owner0", "owner1", "owner2"]
    with Lab(hosts) as lab:
        owners = []
        for i in range(3):
            name = f"owner{i}"
            proc, log = lab.spawn(name, ["python", "-c", OWNER, str(i)], log=name,
                                  env={"NAME": name, "LISTEN": lab.address(name)})
            owners.append((proc, log))
        coord = subprocess.Popen(lab.argv("ai", [lab.python, "-c", COORDINATOR]), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=lab.env("ai", {"LISTEN": lab.address("ai")}), start_new_session=True)
        try:
            lines = []
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                line = coord.stdout.readline()
                if not line:
                    break
                lines.append(line.strip())
                if line.startswith("EVENT round_start 2"):
                    lab.cut("owner2")
                    coord.stdin.write("go\n")
                    coord.stdin.flush()
                if line.startswith("{"):
                    break
            assert lines and lines[-1].startswith("{"), (lines, coord.stderr.read()[-3000:] if coord.poll() is not None else "")
            out = json.loads(lines[-1])
        finally:
            if coord.poll() is None:
                coord.kill()
            coord.wait(timeout=10)
            for proc, _ in owners:
                lab.stop(proc)
    rounds = out["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["peers"] == ["owner0", "owner1", "owner2"]
    assert "owner2" not in rounds[1]["peers"] and len(rounds[1]["peers"]) == 2
    assert "owner2" not in rounds[2]["peers"]
    assert out["accuracy"] > 0.8
