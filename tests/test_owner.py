"""The data owner's path, as a hospital runs it: a peer process, `p2pgrid publish` and
`p2pgrid data ...` from other processes, a scientist computing by column name."""

import json
import subprocess

import numpy as np
import pytest
import torch
import trio

import p2pgrid
from p2pgrid.config import ProfileError, load_profile
from p2pgrid.owner import edit_rules
from p2pgrid.store import Rules

from test_cli import CLI, ROOT, _env, _start_peer, _stop

ROWS = 24


def _cli(tmp_path, *args, timeout=90):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=_env(tmp_path),
                          cwd=ROOT, timeout=timeout)


def _write_files(tmp_path):
    rng = np.random.default_rng(3)
    weight = np.round(rng.normal(3.4, 0.4, ROWS), 3)
    height = np.round(rng.normal(50, 2, ROWS), 2)
    weeks = rng.integers(34, 42, ROWS)
    csv = tmp_path / "births.csv"
    csv.write_text("ward,weight_kg,height_cm,gestation_weeks\n" + "".join(
        f"w{i % 3},{w},{h},{g}\n" for i, (w, h, g) in enumerate(zip(weight, height, weeks))))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"label": np.arange(ROWS) % 2, "score": height / 10}),
                   tmp_path / "labels.parquet")
    np.save(tmp_path / "scans.npy", np.arange(ROWS * 4, dtype=np.float32).reshape(ROWS, 4))
    from safetensors.numpy import save_file
    save_file({"w": np.ones((3, 2), dtype=np.float32)}, str(tmp_path / "weights.safetensors"))
    return weight


@pytest.fixture
def hospital(tmp_path):
    home = tmp_path / "home"
    proc, seed, _ = _start_peer(tmp_path, "--name", "hospital", "--no-mdns")
    try:
        yield proc, seed, home / "hospital"
    finally:
        if proc.poll() is None:
            _stop(proc)


async def test_publish_files_to_running_peer_and_compute_by_column(tmp_path, hospital):
    proc, seed, data = hospital
    weight = _write_files(tmp_path)
    # "the only peer" under $P2PGRID_HOME: no --peer needed (DIR/store/objects.db)
    out = await trio.to_thread.run_sync(lambda: _cli(
        tmp_path, "publish", str(tmp_path / "births.csv"), "--tags", "#birth-records #2024",
        "--description", "Births, Feb 2024", "--compute", "bob,ana", "--get", "ana",
        "--aggregate", "bob", "--min-rows", "10"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"published births ({ROWS}, 3) float64 columns weight_kg, "
                                  "height_cm, gestation_weeks")
    assert "ward" in out.stderr and "not numeric" in out.stderr
    for name in ("labels.parquet", "scans.npy", "weights.safetensors"):
        out = await trio.to_thread.run_sync(lambda: _cli(
            tmp_path, "publish", str(tmp_path / name), "--peer", "hospital", "--tags", "#mine",
            "--compute", "bob"))
        assert out.returncode == 0, out.stderr
    listing = await trio.to_thread.run_sync(lambda: _cli(tmp_path, "data", "list", "--json",
                                                          "--peer", "hospital"))
    items = {m["id"]: m for m in json.loads(listing.stdout)}
    assert set(items) == {"births", "labels", "scans", "weights"}
    assert items["labels"]["columns"] == ["label", "score"] and items["labels"]["dtype"] == "float64"
    assert items["scans"]["shape"] == [ROWS, 4] and items["weights"]["shape"] == [3, 2]

    async with p2pgrid.connect("bob", join=[seed], mdns=False, data_dir=tmp_path / "bob",
                               wait=20) as net:
        hits = await net.search("#weight_kg", wait=20)  # a table is found by its columns
        rec = hits["hospital"][0]
        assert rec.id == "births" and rec.columns == ["weight_kg", "height_cm", "gestation_weeks"]
        assert rec["height_cm"]._node.args[1:] == rec[:, 1]._node.args[1:]
        mean = await rec["weight_kg"].mean().get()
        assert abs(float(mean) - weight.mean()) < 1e-9
        with pytest.raises(KeyError, match="no column 'weight'"):
            rec["weight"]
        # the owner takes bob's aggregate right away, from another process: at once
        out = await trio.to_thread.run_sync(lambda: _cli(
            tmp_path, "data", "rules", "births", "--aggregate", "-bob", "--get", "+carol"))
        assert out.returncode == 0, out.stderr
        assert "aggregate  -" in out.stdout and "get        ana, carol" in out.stdout
        with pytest.raises(p2pgrid.PermissionDenied):
            await rec["weight_kg"].mean().get()
    audit = await trio.to_thread.run_sync(lambda: _cli(tmp_path, "audit", "tail", "-n", "200",
                                                        "--json"))
    assert audit.returncode == 0, audit.stderr
    changes = [e for e in json.loads(audit.stdout) if e["action"] == "rules"]
    assert len(changes) == 1 and changes[0]["old"]["aggregate"] == ["bob"]
    assert changes[0]["new"]["aggregate"] == [] and changes[0]["new"]["get"] == ["ana", "carol"]
    out = await trio.to_thread.run_sync(lambda: _cli(tmp_path, "data", "unpublish", "scans"))
    assert out.returncode == 0 and out.stdout.strip() == "unpublished scans"
    # the owner's terminal said, one line each, what was released and what denied
    _, terminal = _stop(proc)
    assert "p2pgrid.access INFO released to bob from births: aggregate" in terminal, terminal
    assert "p2pgrid.access INFO denied bob on births" in terminal


async def test_owner_commands_need_the_peers_key(tmp_path, hospital):
    """A name alone is not the owner: a caller named 'hospital' with another key is refused."""
    proc, seed, data = hospital
    from p2pgrid.messages import PublishData
    async with p2pgrid.connect("mallory", join=[seed], mdns=False, data_dir=tmp_path / "m",
                               wait=20) as net:
        await net.wait_for_peers(["hospital"], timeout=20)
        with pytest.raises(p2pgrid.PermissionDenied, match="owner"):
            await net._request("hospital", PublishData(torch.zeros(12, 2), id="x", tags=["x"]))


def test_edit_rules_forms():
    r = Rules(compute=("bob",), get=("ana",), min_rows=10)
    assert edit_rules(r, {"compute": ["carol", "dan"]}).compute == ("carol", "dan")
    assert edit_rules(r, {}, min_rows=5).min_rows == 5
    with pytest.raises(p2pgrid.BadRequest):
        edit_rules(r, {"compute": ["+a", "b"]})
    with pytest.raises(p2pgrid.BadRequest):
        edit_rules(r, {"download": ["a"]})


def test_profile_unknown_key_names_nearest(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[peer]\nname = "h"\n[[dataset]]\nid = "x"\ncomptue = ["bob"]\n')
    with pytest.raises(ProfileError, match=r"unknown key 'comptue' in \[\[dataset\]\] x; "
                                           r"did you mean 'compute'\?"):
        load_profile(bad)
    bad.write_text('[peer]\nname = "h"\n[[dataset]]\nid = "x"\ngenerator = "births"\n')
    with pytest.raises(ProfileError, match="unknown generator 'births'"):
        load_profile(bad)


def test_profile_dataset_from_file_and_restart_applies_profile_rules(tmp_path):
    _write_files(tmp_path)
    profile = tmp_path / "h.toml"
    text = ('[peer]\nname = "hospital"\n[[dataset]]\nid = "births"\npath = "births.csv"\n'
            'tags = ["births"]\ncompute = ["bob"]\nget = ["ana"]\n')
    profile.write_text(text)
    data = tmp_path / "hd"
    proc, _, banner = _start_peer(tmp_path, "--profile", str(profile), "--no-mdns",
                                  "--data-dir", str(data))
    _stop(proc)
    assert f"publishes births ({ROWS}, 3)" in banner
    profile.write_text(text.replace('get = ["ana"]', 'get = ["ana", "bob"]'))
    proc, _, banner = _start_peer(tmp_path, "--profile", str(profile), "--no-mdns",
                                  "--data-dir", str(data))
    try:
        assert "stored rules differ from the profile's; applying the profile's" in banner
        out = _cli(tmp_path, "data", "show", "births", "--json", "--data-dir", str(data))
        assert json.loads(out.stdout)["rules"]["get"] == ["ana", "bob"]
    finally:
        _stop(proc)
