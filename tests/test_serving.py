"""Model serving over real peers (TLS HTTP/2 on loopback, gossip)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio
from torch import nn

from p2pgrid.errors import (BadRequest, NotFound, PeerUnavailable, PermissionDenied, RateLimited,
                            ShapeError)
from p2pgrid.modelgraph import model_hash
from p2pgrid.serving import HostingPolicy, Policy
from p2pgrid.serving.gpt import GPT
from p2pgrid.serving.messages import GetChunk, GetManifest, Infer
from p2pgrid.testing import open_network

DIGITS = Policy(input_shape=(None, 1, 28, 28), dtype="float32", value_range=(0, 1), max_batch=256,
                rate_limit="600/min", users=["bob", "ana"])


def digits_model(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10)).eval()


async def wait_hosts(net, name: str, n: int, *others, timeout: float = 10.0):
    """Until `net` (and `others`) see `name` served by at least `n` hosts."""
    with trio.fail_after(timeout):
        for other in others:
            await wait_hosts(other, name, n)
        while True:
            hits = [i for i in net.models() if i.name == name]
            if hits and len(hits[0].hosts) >= n:
                return hits[0]
            await trio.sleep(0.05)


async def test_private_inference_policy_errors_and_audit(tmp_path):
    async with open_network(["hospital", "bob", "eve"], tmp_path) as grid:
        model = digits_model()
        hospital, bob, eve = grid.net("hospital"), grid.net("bob"), grid.net("eve")
        audit = []
        grid["hospital"].audit_sinks.append(audit.append)
        await hospital.serve_model(model, "digits-classifier", allow_download=False, policy=DIGITS)
        await hospital.serve_model(digits_model(1), "digits-limited",
                                   policy=Policy(rate_limit="3/min", quota="10/day"))
        info = await wait_hosts(bob, "digits-classifier", 1, eve)
        await wait_hosts(bob, "digits-limited", 1, eve)
        assert info.flags() == ["inference"] and info.policy["users"] == ["bob", "ana"]

        x = torch.rand(7, 1, 28, 28)
        y = await bob.run_inference("digits-classifier", x)
        assert torch.allclose(y, model(x), atol=1e-6)  # private inference == local inference

        bad = {
            "shape": (torch.rand(7, 1, 28, 27), ShapeError, "shape"),
            "dtype": (x.double(), ShapeError, "dtype"),
            "range": (x * 2, BadRequest, "[0.0, 1.0]"),
            "batch": (torch.rand(257, 1, 28, 28), BadRequest, "limit of 256"),
            "finite": (torch.full((1, 1, 28, 28), float("nan")), BadRequest, "NaN"),
        }
        for what, (inp, err, words) in bad.items():
            with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
                await bob.run_inference("digits-classifier", inp)
        with pytest.raises(NotFound, match="no peer serves"):
            await bob.run_inference("no-such-model", x)
        with pytest.raises(NotFound):  # the host itself answers NotFound too
            await grid["bob"].request("hospital", Infer("hospital", "no-such-model", x))
        with pytest.raises(PermissionDenied, match="eve is not on the list"):
            await eve.run_inference("digits-classifier", x)

        for _ in range(3):
            await eve.run_inference("digits-limited", x[:2])
        with pytest.raises(RateLimited, match="3/min") as exc:
            await eve.run_inference("digits-limited", x[:2])
        assert exc.value.details["retry_after"] > 0
        await bob.run_inference("digits-limited", torch.rand(8, 1, 28, 28))
        with pytest.raises(RateLimited, match="quota of 10/day"):  # 8 rows used, 3 more is over
            await bob.run_inference("digits-limited", torch.rand(3, 1, 28, 28))

        # non-downloadable: refused by the client API and by the host itself
        with pytest.raises(PermissionDenied, match="may not be downloaded"):
            await bob.download_model("digits-classifier")
        with pytest.raises(PermissionDenied):
            await grid["bob"].request("hospital", GetManifest("hospital", "digits-classifier"))
        with pytest.raises(PermissionDenied):
            await grid["bob"].request("hospital", GetChunk("hospital", "digits-classifier", info.hash, 0))

        # after every refusal the peer still serves
        y = await bob.run_inference("digits-classifier", x)
        assert torch.allclose(y, model(x), atol=1e-6)

        calls = [e for e in audit if e["action"] == "model_call"]
        outcomes = [(e["caller"], e["outcome"]) for e in calls]
        assert ("bob", "ok") in outcomes and ("eve", "permission_denied") in outcomes
        assert ("eve", "rate_limited") in outcomes and ("bob", "shape_error") in outcomes
        assert all(e["batch"] >= 1 and "model" in e for e in calls)
        assert len(calls) == 1 + 5 + 1 + 1 + 4 + 2 + 1  # every call above, refusals included
        assert [e["outcome"] for e in audit if e["action"] == "model_download"] == ["permission_denied"]


async def test_replica_failover_loses_no_request(tmp_path):
    async with open_network(["hospital", "clinic", "lab", "bob"], tmp_path) as grid:
        model = digits_model(width=256)
        bob = grid.net("bob")
        await bob.set_hosting(HostingPolicy(accept_from=()))  # bob hosts nobody's replicas
        await grid.net("hospital").serve_model(model, "digits", policy=DIGITS, replicas=2)
        info = await wait_hosts(bob, "digits", 3)
        assert sorted(info.hosts.values()) == ["clinic", "hospital", "lab"]

        xs = [torch.rand(16, 1, 28, 28) for _ in range(80)]
        # each host answers once before the run: a replica's first answer (its model's
        # first call) is slow, and a router that saw only that would never pick it again
        for host in info.hosts:
            await grid["bob"].request(host, Infer("hospital", "digits", xs[0]))
        results: dict[int, torch.Tensor] = {}
        todo = iter(range(len(xs)))
        routes = grid["bob"].extensions["serving"].routes
        killed = []

        async def worker():
            for i in todo:
                results[i] = await bob.run_inference("digits", xs[i])

        async def killer():
            while len(results) < 20:
                await trio.sleep(0.005)
            busy = routes.snapshot()
            # stop the busiest replica (the owner stays up)
            victim = max((k for k in info.hosts if info.hosts[k] != "hospital"),
                         key=lambda k: busy.get(f"{k}/hospital/digits", {}).get("calls", 0))
            killed.append(info.hosts[victim])
            await grid.stop(info.hosts[victim])

        async with trio.open_nursery() as n:
            n.start_soon(killer)
            for _ in range(6):
                n.start_soon(worker)
        assert len(results) == len(xs)
        for i, x in enumerate(xs):
            assert torch.allclose(results[i], model(x), atol=1e-5)
        snap = routes.snapshot()
        victim = next(k for k, v in info.hosts.items() if v == killed[0])
        assert snap[f"{victim}/hospital/digits"]["failures"] >= 1
        served_by = {v: snap[f"{k}/hospital/digits"]["calls"] for k, v in info.hosts.items()}
        assert sum(served_by.values()) >= len(xs) and all(served_by.values())  # load was spread


async def test_lost_replica_is_replaced_and_a_returning_host_drops_its_copy(tmp_path):
    async with open_network(["hospital", "clinic", "lab", "bob"], tmp_path) as grid:
        model = digits_model()
        bob, hospital = grid.net("bob"), grid.net("hospital")
        audit = []
        grid["hospital"].audit_sinks.append(audit.append)
        await bob.set_hosting(HostingPolicy(accept_from=()))
        await hospital.serve_model(model, "digits", policy=DIGITS, replicas=1)
        info = await wait_hosts(bob, "digits", 2)
        [first] = [n for n in info.hosts.values() if n != "hospital"]
        [other] = {"clinic", "lab"} - {first}

        await grid.stop(first)  # its record expires (ttl 5 s); the owner places another
        with trio.fail_after(30):
            while sorted(bob.model_info("digits").hosts.values()) != sorted(["hospital", other]):
                await trio.sleep(0.1)
        assert other in {h.name for h in grid["hospital"].directory.peers()}
        serving = grid[other].extensions["serving"]
        assert serving.models[("hospital", "digits")].role == "replica"
        assert ("replica_lost", first) in [(e["action"], e["caller"]) for e in audit]
        x = torch.rand(4, 1, 28, 28)
        assert torch.allclose(await bob.run_inference("digits", x), model(x), atol=1e-5)

        # the first host returns with the copy it kept on disk; the owner counts one
        # replica only, so that copy goes (after the grace period)
        back = await grid.start(grid.configs[first])
        with trio.fail_after(40):
            while ("hospital", "digits") in back.extensions["serving"].models or \
                    not back.extensions["serving"].loaded.is_set():
                await trio.sleep(0.1)
        with trio.fail_after(10):  # bob hears of it by gossip
            while sorted(bob.model_info("digits").hosts.values()) != sorted(["hospital", other]):
                await trio.sleep(0.1)
        assert len(grid["hospital"].extensions["serving"].models[("hospital", "digits")]
                   .replicas) == 1


async def test_named_hosts_only_and_a_returning_host_is_counted_again(tmp_path):
    async with open_network(["hospital", "clinic", "lab"], tmp_path) as grid:
        hospital = grid.net("hospital")
        audit = []
        grid["hospital"].audit_sinks.append(audit.append)
        await hospital.serve_model(digits_model(), "digits", hosts=["clinic"])  # anyone may call
        hm = grid["hospital"].extensions["serving"].models[("hospital", "digits")]
        assert list(hm.replicas.values()) == ["clinic"] and hm.pool == ["clinic"]

        await grid.stop("clinic")  # written off once its record expires (ttl 5 s)...
        with trio.fail_after(30):
            while hm.replicas:
                await trio.sleep(0.1)
        await trio.sleep(3)  # ...and not re-placed on lab, which the owner did not name
        assert ("hospital", "digits") not in grid["lab"].extensions["serving"].models
        assert not hm.replicas

        back = await grid.start(grid.configs["clinic"])  # back with its copy: counted again
        clinic_audit = []
        back.audit_sinks.append(clinic_audit.append)
        with trio.fail_after(40):
            while list(hm.replicas.values()) != ["clinic"]:
                await trio.sleep(0.1)
        actions = {e["action"] for e in audit}
        assert "replica_lost" in actions and actions & {"replica_back", "replica_placed"}
        # it kept its copy on disk: nothing was uploaded again
        assert "model_hosted" not in {e["action"] for e in clinic_audit}
        x = torch.rand(2, 1, 28, 28)
        y = await grid.net("lab").run_inference("hospital/digits", x)
        assert y.shape == (2, 10)


async def test_download_public_model_verified_by_hash(tmp_path):
    async with open_network(["company", "bob"], tmp_path) as grid:
        torch.manual_seed(0)
        lm = GPT(vocab=50, context=32, width=32, depth=2, heads=4).eval()
        await grid.net("company").serve_model(lm, "tiny-gpt", allow_download=True,
                                              allow_remote_inference=False)
        bob = grid.net("bob")
        await wait_hosts(bob, "tiny-gpt", 1)
        with pytest.raises(PermissionDenied, match="does not allow remote inference"):
            await bob.run_inference("tiny-gpt", torch.zeros(1, 4, dtype=torch.long))
        got = await bob.download_model("tiny-gpt")
        assert model_hash(got) == model_hash(lm) == bob.model_info("tiny-gpt").hash
        idx = torch.randint(0, 50, (3, 20))
        assert torch.equal(got(idx), lm(idx))


def fifty_mb_model() -> nn.Module:
    torch.manual_seed(1)
    return GPT(vocab=8192, context=128, width=512, depth=3, heads=8).eval()  # 13.7 M params


async def test_chunked_transfers_resume_after_broken_connections(tmp_path):
    async with open_network(["hospital", "clinic", "bob"], tmp_path) as grid:
        big = fifty_mb_model()
        want = model_hash(big)
        hospital, bob = grid.net("hospital"), grid.net("bob")
        info = await hospital.serve_model(big, "big", allow_download=True)
        assert 50e6 < info.size < 60e6
        await wait_hosts(bob, "big", 1)

        # download: the only host stops after 4 chunks; the next call resumes
        async with trio.open_nursery() as n:
            stopped = trio.Event()

            async def stop_hospital():
                await grid.stop("hospital")
                stopped.set()

            async def cut(i, seen=[]):
                seen.append(i)
                if len(seen) == 4:
                    n.start_soon(stop_hospital)
                    await stopped.wait()  # no more chunk is asked for before it is down
            with pytest.raises(PeerUnavailable, match="call again to resume"):
                await bob.download_model("big", attempts=1, on_chunk=cut)
        restarted = await grid.start(grid.configs["hospital"])  # serves "big" again from its package
        with trio.fail_after(20):
            await restarted.extensions["serving"].loaded.wait()
        await wait_hosts(bob, "big", 1)
        got = await bob.download_model("big")
        report = grid["bob"].extensions["serving"].last_download
        assert report.had >= 4 and report.sent == report.chunks - report.had
        assert model_hash(got) == want

        # upload: the replica host stops after 4 chunks and comes back; the upload
        # re-offers, learns which chunks the host kept, and sends only the others
        hospital = grid.net("hospital")
        async with trio.open_nursery() as n:
            stopped = trio.Event()

            async def bounce():
                await grid.stop("clinic")
                stopped.set()
                await trio.sleep(0.3)
                await grid.start(grid.configs["clinic"])

            async def cut(i, seen=[]):
                seen.append(i)
                if len(seen) == 4:
                    n.start_soon(bounce)
                    await stopped.wait()  # no more chunk is sent before it is down
            [report] = await hospital.replicate_model("big", hosts=["clinic"], on_chunk=cut)
        assert report.attempts >= 2 and report.resumed_with[0] == 0
        assert report.resumed_with[-1] >= 4 and report.sent <= report.chunks
        info = await wait_hosts(bob, "big", 2)
        assert "clinic" in info.hosts.values()
        x = torch.randint(0, 8192, (2, 16))
        clinic_model = grid["clinic"].extensions["serving"].get("hospital", "big").module
        assert model_hash(clinic_model) == want and torch.equal(clinic_model(x), big(x))


async def test_cli_lists_models_hosts_and_flags(tmp_path, capsys):
    from p2pgrid.cli import build_parser
    from p2pgrid.serving.cli import run_models

    async with open_network(["hospital", "clinic"], tmp_path) as grid:
        await grid.net("hospital").serve_model(digits_model(), "digits", policy=DIGITS, replicas=1,
                                               description="MNIST digits, 10 classes")
        await wait_hosts(grid.net("clinic"), "digits", 2, grid.net("hospital"))
        seed = f"{grid['hospital'].key_id}@{grid['hospital'].address}"
        args = build_parser().parse_args(["models", "--join", seed, "--no-mdns", "--as", "carol",
                                          "--data-dir", str(tmp_path / "carol"), "--wait", "5"])
        assert await run_models(args) == 0
        out = capsys.readouterr().out
        assert "digits" in out and "hospital,clinic" in out and "inference" in out
        assert "shape=(N,1,28,28) float32 range=[0,1] batch<=256 rate=600/min users=bob,ana" in out
        args.json = True
        assert await run_models(args) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert row["flags"] == ["inference"] and sorted(row["hosts"]) == ["clinic", "hospital"]


async def test_encrypted_serving_matches_plaintext_and_only_users_get_answers(tmp_path):
    from p2pgrid.config import PeerConfig

    # bob's peer shares his inputs only among parties and a dealer it trusts
    bob = PeerConfig(name="bob", data_dir=tmp_path / "bob", smpc_parties=("hospital", "clinic"),
                     crypto_providers=("university",))
    peers = ["company", "hospital", "clinic", bob, "eve",
             PeerConfig(name="university", roles=("crypto-provider",), data_dir=tmp_path / "u")]
    async with open_network(peers, tmp_path, gossip_interval=0.5, ttl=30.0) as grid:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
        info = await grid.net("company").serve_model(
            model, "digits-encrypted", mpc=True, parties=["hospital", "clinic"],
            dealer="university", policy=Policy(input_shape=(None, 1, 28, 28), dtype="float32",
                                               value_range=(0, 1), users=["bob"], max_batch=4,
                                               rate_limit="4/min", quota="8/day"))
        assert info.mpc["parties"] == ["hospital", "clinic"] and info.flags() == ["mpc"]
        bob, eve = grid.net("bob"), grid.net("eve")
        await wait_hosts(bob, "digits-encrypted", 1, eve)
        with trio.fail_after(10):  # smpc's own announcement travels in the same record
            while "smpc-models" not in grid["bob"].record("company").services:
                await trio.sleep(0.05)
        x = torch.rand(3, 1, 28, 28)
        y = await bob.run_encrypted_inference("digits-encrypted", x)
        assert y.shape == (3, 10) and torch.allclose(y, model(x), atol=2e-2)
        with pytest.raises(ShapeError):  # checked where the input is: at the caller
            await bob.run_encrypted_inference("digits-encrypted", torch.rand(3, 784))
        with pytest.raises(PermissionDenied):
            await eve.run_encrypted_inference("digits-encrypted", x)
        # and no plaintext inference, nor download: the refusal says what to use instead
        with pytest.raises(PermissionDenied, match="served encrypted.*run_encrypted_inference") as e:
            await bob.run_inference("digits-encrypted", x)
        assert "remote inference only" not in str(e.value)
        with pytest.raises(PermissionDenied, match="served encrypted.*run_encrypted_inference") as e:
            await bob.download_model("digits-encrypted")
        assert "remote inference only" not in str(e.value)

        # the parties enforce batch, rate and quota themselves: a caller that skips
        # run_encrypted_inference's checks and asks them directly is refused too
        handle = await bob.encrypted_model("company", "digits-encrypted")
        xs = await bob.share(torch.rand(5, 1, 28, 28, dtype=torch.float64),
                             parties=handle.parties, dealer=handle.dealer)
        with pytest.raises(BadRequest, match="limit of 4"):
            await handle.predict(xs)
        await xs.delete()
        await bob.run_encrypted_inference("digits-encrypted", x)  # call 2, rows 6
        with pytest.raises(RateLimited, match="quota of 8/day"):   # call 3 (counted), rows 9
            await bob.run_encrypted_inference("digits-encrypted", x)
        await bob.run_encrypted_inference("digits-encrypted", x[:2])  # call 4, rows 8
        with pytest.raises(RateLimited, match="4/min") as exc:
            await bob.run_encrypted_inference("digits-encrypted", x[:1])
        assert exc.value.details["retry_after"] > 0


SMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sms-spam" / "SMSSpamCollection.tsv"


@pytest.mark.skipif(not SMS.exists(), reason="SMS Spam Collection not in ../shared/data")
def test_tiny_gpt_script_trains_on_sms_serves_downloads_and_samples():
    # scripts/tiny_gpt.py, reduced: a real SMS-trained model, served for download,
    # fetched by another peer (hash-checked) and sampled there
    script = Path(__file__).resolve().parents[1] / "scripts" / "tiny_gpt.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(SMS), "--steps", "200",
                           "--seconds", "60", "--width", "32", "--depth", "1", "--heads", "2",
                           "--context", "32", "--sample-chars", "40"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["data"]["messages"] > 5000
    served = out["serving"]
    assert served["hash_verified"] and served["outputs_equal"]
    assert served["downloaded_hash"] == served["served_hash"]
    # it learned the corpus: better than guessing characters by their frequency
    assert out["val_loss_nats_per_char"] < out["unigram_entropy_nats_per_char"] - 0.2
    assert len(served["samples"]) == 3 and all(len(s) >= 40 for s in served["samples"])
