"""The governance database and the owner's commands, without a network."""

import json
import multiprocessing
import sqlite3
import threading

import pytest

from p2pgrid.cli import main
from p2pgrid.errors import Conflict, NotFound
from p2pgrid.governance import PrivacyBudgetExceeded
from p2pgrid.governance.audit import link
from p2pgrid.governance.mechanism import Bounds
from p2pgrid.governance.roles import format_key
from p2pgrid.governance.store import DEFAULT_EPSILON, GovernanceStore
from p2pgrid.identity import Identity


def _charge(store, user="bob", eps=0.1, rid=None, oid="births", pooled=False):
    import os
    return store.charge(user=user, object_id=oid, epsilon=eps, release_id=rid or os.urandom(16).hex(),
                        query={"kind": "sum"}, value=b"\x00", pooled=pooled)


def test_requests_and_grants_survive_reopening(tmp_path):
    path = tmp_path / "g.db"
    s = GovernanceStore(path)
    a = s.create_request(user="bob", key_id="k", object_id="births", right="get", epsilon=None,
                         reason="monthly statistics")
    b = s.create_request(user="ana", key_id="k2", object_id="births", right="budget", epsilon=0.5,
                         reason="means")
    s.close()
    s = GovernanceStore(path)
    assert [r["id"] for r in s.requests("pending")] == [a["id"], b["id"]]
    assert not s.has_grant("bob", "births")
    assert s.decide(a["id"], approve=True, by="owner")["status"] == "approved"
    assert s.has_grant("bob", "births") and not s.has_grant("ana", "births")
    with pytest.raises(Conflict, match="already approved"):
        s.decide(a["id"], approve=False, by="owner")
    with pytest.raises(NotFound):
        s.decide("nope", approve=True, by="owner")
    s.decide(b["id"], approve=True, by="owner")
    assert s.remaining("ana")["remaining"] == pytest.approx(DEFAULT_EPSILON + 0.5)  # default + granted
    s.close()


def test_budget_limits_and_idempotent_releases(tmp_path):
    s = GovernanceStore(tmp_path / "g.db")
    s.set_default_budget(0.3, by="owner")
    value, limits, replayed = _charge(s, rid="r" * 32, eps=0.2)
    assert not replayed and limits["user"]["left"] == pytest.approx(0.1)
    # a retry of the same release returns it without a second charge
    again = _charge(s, rid="r" * 32, eps=0.2)
    assert again[2] and s.spent("bob") == pytest.approx(0.2)
    with pytest.raises(Conflict):
        _charge(s, user="ana", rid="r" * 32)
    with pytest.raises(PrivacyBudgetExceeded) as e:
        _charge(s, eps=0.2)
    assert e.value.remaining == pytest.approx(0.1) and e.value.details["requested"] == 0.2
    assert s.spent("bob") == pytest.approx(0.2)  # no charge without a release
    _charge(s, eps=0.1)                         # exactly what is left passes
    # a per-dataset cap and a dataset total apply on top of the user's total
    s.set_budget("ana", 10.0, by="owner")
    s.set_budget("ana", 1.0, "births", by="owner")
    s.set_dataset("births", Bounds.parse([[0, 1]]), 1.5, by="owner")
    _charge(s, user="ana", eps=1.0)
    with pytest.raises(PrivacyBudgetExceeded, match="ana's budget on births"):
        _charge(s, user="ana", eps=0.1)
    _charge(s, user="ana", eps=1.0, oid="other")
    assert s.datasets()["births"]["spent"] == pytest.approx(1.3)
    s.close()


def test_one_address_spends_only_its_share_of_the_guests_budget(tmp_path):
    from p2pgrid.limits import Guest
    path = tmp_path / "g.db"
    s = GovernanceStore(path)
    s.set_guest_budget(1.0, by="owner")
    here, there = Guest("10.0.0.6", 0.4), Guest("::ffff:10.0.0.9", 0.4)   # 0.4 of 1.0 each
    for name in ("s1", "s2", "s3", "s4"):       # fresh names, one address: 0.4 in all
        try:
            _charge(s, user=name, eps=0.15, pooled=here)
        except PrivacyBudgetExceeded as e:
            assert "at this address" in e.message and e.remaining == pytest.approx(0.1)
    assert s.pooled_spent("10.0.0.6") == pytest.approx(0.3)
    assert s.remaining("s9", pooled=here)["address"]["left"] == pytest.approx(0.1)
    _charge(s, user="t1", eps=0.4, pooled=there)            # another address: its own share
    assert s.pooled_spent("10.0.0.9") == pytest.approx(0.4)
    _charge(s, user="u1", eps=0.3, pooled=True)             # no address: the pool alone
    s.close()
    s = GovernanceStore(path)                                # the shares outlive a restart
    with pytest.raises(PrivacyBudgetExceeded, match="unregistered users share"):
        _charge(s, user="t2", eps=0.05, pooled=Guest("10.0.0.7", 0.4))   # the pool: 1.0 spent
    assert s.pooled_spent() == pytest.approx(1.0)
    s.close()


def test_a_database_from_before_addresses_is_upgraded(tmp_path):
    path = tmp_path / "g.db"
    s = GovernanceStore(path)
    _charge(s, user="old", eps=0.2, pooled=True)
    s.close()
    with sqlite3.connect(path) as db:      # as the previous schema left it
        db.execute("DROP INDEX ledger_pooled")
        db.execute("ALTER TABLE ledger DROP COLUMN address")
        db.execute("PRAGMA user_version = 2")
    s = GovernanceStore(path)
    assert s.pooled_spent() == pytest.approx(0.2) and s.pooled_spent("10.0.0.6") == 0
    from p2pgrid.limits import Guest
    _charge(s, user="new", eps=0.1, pooled=Guest("10.0.0.6"))
    assert s.pooled_spent("10.0.0.6") == pytest.approx(0.1)
    s.close()


def _race(path, n, out):
    s = GovernanceStore(path)
    ok = 0
    for _ in range(n):
        try:
            _charge(s, eps=0.1)
            ok += 1
        except PrivacyBudgetExceeded:
            pass
    s.close()
    out.put(ok)


def test_concurrent_charges_across_processes_and_threads_never_overspend(tmp_path):
    path = tmp_path / "g.db"
    s = GovernanceStore(path)
    s.set_budget("bob", 1.0, by="owner")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, 8, out)) for _ in range(3)]
    for p in procs:
        p.start()
    # and threads of this process, on one connection
    results = []

    def thread():
        try:
            _charge(s, eps=0.1)
            results.append(True)
        except PrivacyBudgetExceeded:
            results.append(False)

    threads = [threading.Thread(target=thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(60)
    passed = sum(out.get(timeout=5) for _ in procs) + sum(results)
    assert passed == 10
    assert s.spent("bob") == pytest.approx(1.0) and s.spent("bob") <= 1.0 + 1e-9
    assert len(s.ledger(100)) == 10
    assert sum(1 for e in s.audit_tail(100) if e["action"] == "release") == 10
    s.close()


def _logged_store(tmp_path, n=6):
    ident = Identity.load_or_create(tmp_path / "identity.key")
    s = GovernanceStore(tmp_path / "governance.db", sign=ident.sign)
    for i in range(n):
        s.record({"action": "get", "caller": "bob", "object": f"o{i}"})
    s.flush()
    s.checkpoint()
    return s, ident


@pytest.mark.parametrize("tamper, problem", [
    ("UPDATE audit SET entry = replace(entry, 'bob', 'eve') WHERE seq = 3",
     "entry 3: hash does not match"),
    ("DELETE FROM audit WHERE seq = 2", "entries 2..2 are missing"),
    ("DELETE FROM audit WHERE seq > 4", "cut short"),
    ("UPDATE audit_checkpoints SET hash = '00'", "bad signature"),
    ("UPDATE audit SET seq = seq + 100 WHERE seq = 6", "missing"),
])
def test_a_tampered_audit_log_is_detected(tmp_path, tamper, problem):
    s, ident = _logged_store(tmp_path)
    assert s.verify(ident.public_bytes).ok
    s.close()
    db = sqlite3.connect(tmp_path / "governance.db")
    db.execute(tamper)
    db.commit()
    db.close()
    s = GovernanceStore(tmp_path / "governance.db")
    verdict = s.verify(ident.public_bytes)
    assert not verdict.ok and any(problem in p for p in verdict.problems), verdict.problems
    s.close()


def test_rewriting_the_chain_consistently_still_breaks_the_checkpoint(tmp_path):
    s, ident = _logged_store(tmp_path)
    s.close()
    db = sqlite3.connect(tmp_path / "governance.db")
    rows = db.execute("SELECT seq, entry, prev FROM audit ORDER BY seq").fetchall()
    prev = "0" * 64
    for seq, entry, _ in rows:  # an attacker rewrites entry 2 and re-links everything after
        entry = entry.replace("o1", "o9") if seq == 2 else entry
        h = link(prev, entry)
        db.execute("UPDATE audit SET entry = ?, prev = ?, hash = ? WHERE seq = ?", (entry, prev, h, seq))
        prev = h
    db.commit()
    db.close()
    s = GovernanceStore(tmp_path / "governance.db")
    verdict = s.verify(ident.public_bytes)
    assert not verdict.ok and "differs from the signed one" in verdict.problems[0]
    s.close()


def test_audit_verify_command(tmp_path, capsys):
    s, _ = _logged_store(tmp_path)
    s.close()
    assert main(["audit", "--verify", "--data-dir", str(tmp_path)]) == 0
    assert "audit chain intact: 6 entries, 1 signed checkpoint" in capsys.readouterr().out
    assert main(["audit", "tail", "-n", "2", "--data-dir", str(tmp_path)]) == 0
    tail = capsys.readouterr().out
    assert "o5" in tail and "o3" not in tail
    db = sqlite3.connect(tmp_path / "governance.db")
    db.execute("UPDATE audit SET entry = replace(entry, 'o4', 'o7') WHERE seq = 5")
    db.commit()
    db.close()
    assert main(["audit", "--verify", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out and "entry 5: hash does not match" in out


def test_owner_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("P2PGRID_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "hospital").mkdir(parents=True)
    peer = ["--peer", "hospital"]

    def run(*argv):
        code = main(list(argv))
        return code, capsys.readouterr()

    code, out = run("users", "key", "--as", "bob")
    bob_key = out.out.strip()
    assert code == 0 and len(bob_key) == 43
    assert format_key(Identity.load_or_create(tmp_path / "home" / "bob" / "identity.key")
                      .public_bytes) == bob_key
    assert run("users", "add", "bob", "--role", "scientist", f"--key={bob_key}", *peer)[0] == 0
    assert run("users", "add", "gail", "--role", "guest", *peer)[0] == 0
    code, out = run("users", "add", "x y", "--role", "guest", *peer)
    assert code == 1 and "user name" in out.err
    assert run("users", "mode", "registered", *peer)[0] == 0
    code, out = run("users", "list", "--json", *peer)
    users = {u["name"]: u for u in json.loads(out.out)}
    assert users["bob"]["key"] == bob_key and users["gail"]["role"] == "guest"
    assert users["gail"]["key"] is None
    assert "registered users only" in run("users", "list", *peer)[1].out
    assert run("users", "remove", "gail", *peer)[0] == 0
    # without --peer: the only peer that has run here, else a list of candidates
    with pytest.raises(SystemExit, match="no peer has run"):
        run("users", "list")
    # a peer that has run keeps its store at DIR/store/objects.db
    (tmp_path / "home" / "hospital" / "store").mkdir()
    (tmp_path / "home" / "hospital" / "store" / "objects.db").touch()
    assert "bob" in run("users", "list")[1].out
    (tmp_path / "home" / "clinic" / "store").mkdir(parents=True)
    (tmp_path / "home" / "clinic" / "store" / "objects.db").touch()
    with pytest.raises(SystemExit, match="peers here: clinic, hospital"):
        run("users", "list")
    assert run("users", "remove", "gail", *peer)[0] == 1

    assert run("budget", "bounds", "births", "0:60", "1000:5000", "0:1", "--total", "5", *peer)[0] == 0
    assert run("budget", "bounds", "temps", *peer, "--", "-40:50")[0] == 0
    assert run("budget", "set", "bob", "1.5", *peer)[0] == 0
    assert run("budget", "set", "bob", "0.5", "--dataset", "births", *peer)[0] == 0
    assert run("budget", "default", "0.25", *peer)[0] == 0
    shown = json.loads(run("budget", "show", "--json", *peer)[1].out)
    assert shown["datasets"]["births"]["epsilon"] == 5.0
    assert shown["datasets"]["temps"]["bounds"] == [[-40.0, 50.0]]
    assert {(b["user"], b["object_id"], b["epsilon"]) for b in shown["budgets"]} == {
        ("bob", None, 1.5), ("bob", "births", 0.5)}
    assert shown["default_epsilon"] == 0.25
    code, out = run("budget", "bounds", "x", "1:2:3", *peer)
    assert code == 1

    s = GovernanceStore(tmp_path / "home" / "hospital" / "governance.db")
    r1 = s.create_request(user="bob", key_id="k", object_id="births", right="get", epsilon=None,
                          reason="rows for a study")
    r2 = s.create_request(user="bob", key_id="k", object_id="births", right="budget", epsilon=1.0,
                          reason="more means")
    listed = run("requests", "list", *peer)[1].out
    assert r1["id"] in listed and "rows for a study" in listed and "epsilon 1" in listed
    assert run("requests", "approve", r1["id"], *peer)[0] == 0
    assert run("requests", "deny", r2["id"], "--why", "too much", *peer)[0] == 0
    assert run("requests", "deny", r2["id"], "--why", "again", *peer)[0] == 1
    assert s.has_grant("bob", "births")
    assert s.request(r2["id"])["why"] == "too much"
    assert "bob" in run("requests", "grants", *peer)[1].out
    assert run("requests", "revoke", "bob", "births", *peer)[0] == 0
    assert not s.has_grant("bob", "births")
    code, out = run("requests", "revoke", "bob", "births", *peer)
    assert code == 1 and out.err.strip() == "p2pgrid requests: bob holds no get grant on births"
    assert "no pending requests" in run("requests", "list", *peer)[1].out
    assert "too much" in run("requests", "list", "--all", *peer)[1].out
    s.close()

    token = run("web", "token", *peer)[1].out.strip()
    assert len(token) >= 24 and run("web", "token", *peer)[1].out.strip() == token
    assert run("web", "url", *peer)[0] == 1  # never served yet
    (tmp_path / "home" / "hospital" / "console-port").write_text("8123\n")
    assert run("web", "url", *peer)[1].out.strip() == f"http://127.0.0.1:8123/login?token={token}"
    assert run("web", "config", "--port", "9000", *peer)[0] == 0
    assert run("web", "token", "--rotate", *peer)[1].out.strip() != token
    assert run("audit", "--verify", *peer)[0] == 0
    actions = [e["action"] for e in json.loads(run("audit", "tail", "-n", "50", "--json", *peer)[1].out)]
    assert {"user.add", "user.remove", "setting", "dataset", "budget", "request", "decision",
            "grant.revoke"} <= set(actions)

    with pytest.raises(SystemExit, match="--peer NAME or --data-dir"):
        main(["users", "list"])
