"""The peer's page and the owner's console: what anyone sees, login, CSRF, and a real browser."""

import os
import re
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import torch
import trio

import p2pgrid
from p2pgrid.datasets import birth_records
from p2pgrid.governance import Bounds, of
from p2pgrid.testing import open_network
from p2pgrid.console.views import training_runs

BIRTHS = birth_records(200, seed=3)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


class _Round:
    def __init__(self, r, loss, acc):
        self.r, self.loss, self.acc = r, loss, acc

    def to_dict(self):
        return {"round": self.r, "loss": self.loss, "accuracy": self.acc, "eval_loss": None}


class _Run:
    job = "births-logreg"
    history = [_Round(i, 0.9 / i, 0.5 + 0.08 * i) for i in range(1, 6)]


async def _scene(grid):
    """hospital: a dataset with rules and bounds, users, a pending request from bob."""
    hospital = grid["hospital"]
    ptr = await grid.net("hospital").publish(BIRTHS, tags=["births", "february"],
                                             description="synthetic births", compute=["bob"], get=[])
    gov = of(hospital)
    gov.store.add_user("bob", "scientist", grid["bob"].identity.public_bytes, by="test")
    gov.store.set_dataset(ptr.id, Bounds.parse([[0, 60], [0, 6000], [0, 1]]), 5.0, by="test")
    gov.store.set_budget("bob", 2.0, by="test")
    hospital.services["births-logreg"] = {"kind": "classifier", "input": [None, 3]}
    ext = hospital.extensions.get("federated")
    if ext is None:
        hospital.extensions["federated"] = {"runs": {"job-1": _Run()}}
    else:
        ext.runs = {"job-1": _Run()}
    await grid.wait_searchable("#births")
    rec = (await grid.net("bob").search("#births"))["hospital"][0]
    await rec[:, 0].mean().get(epsilon=0.5)
    req = await rec.request_access(reason="rows for the monthly report")
    return gov, rec, req


async def test_public_page_shows_only_public_facts(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        gov, rec, req = await _scene(grid)
        async with httpx.AsyncClient(follow_redirects=False) as client:
            page = (await client.get(gov.console_url + "/")).text
        assert "hospital" in page and rec.id in page and "#february" in page
        assert "synthetic births" in page and "births-logreg" in page and "bob" in page  # peers
        assert 'id="login"' in page
        for private in ["rows for the monthly report", req.id, "compute:", "Audit trail",
                        "Pending requests", "scientist", "privacy budget", "accuracy"]:
            assert private not in page, private
        # the peer's own port (Ed25519 TLS, HTTP/2) serves the same public page
        async with httpx.AsyncClient(verify=False, http2=True) as client:
            r = await client.get(f"https://{grid['hospital'].address}/")
            assert r.status_code == 200 and rec.id in r.text and req.id not in r.text
            assert (await client.post(f"https://{grid['hospital'].address}/x")).status_code in (404, 405)


async def test_login_csrf_and_approval_over_http(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        gov, rec, req = await _scene(grid)
        base = gov.console_url
        async with httpx.AsyncClient(base_url=base, follow_redirects=False) as client:
            r = await client.post("/login", data={"token": "wrong"})
            assert r.status_code == 403 and "wrong token" in r.text
            assert r.headers["content-security-policy"].startswith("default-src 'none'")
            assert r.headers["x-frame-options"] == "DENY"
            # without a session, a decision is refused with the login form
            r = await client.post(f"/requests/{req.id}", data={"decision": "approve"})
            assert r.status_code == 401 and 'id="token"' in r.text
            assert gov.store.request(req.id)["status"] == "pending"
            r = await client.get("/login", params={"token": gov.token})
            assert r.status_code == 303
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
            page = (await client.get("/")).text
            assert "rows for the monthly report" in page and f'id="approve-{req.id}"' in page
            assert "compute: bob" in page and "chain intact" in page and "births-logreg" in page
            assert "0.5 / 5" in page  # budget used on the dataset
            assert "accuracy" in page and "<polyline" in page  # the training curve
            csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            # wrong CSRF token, or a cross-site origin: refused
            r = await client.post(f"/requests/{req.id}", data={"decision": "approve", "csrf": "x"})
            assert r.status_code == 403
            r = await client.post(f"/requests/{req.id}", data={"decision": "approve", "csrf": csrf},
                                  headers={"origin": "http://evil.example"})
            assert r.status_code == 403 and gov.store.request(req.id)["status"] == "pending"
            r = await client.post(f"/requests/{req.id}", data={"decision": "deny", "csrf": csrf,
                                                               "why": "not this month"})
            assert r.status_code == 303 and r.headers["location"] == "/#requests"
            await req.wait(timeout=10)
            assert req.status == "denied" and req.why == "not this month"
            page = (await client.get("/")).text
            assert "denied" in page and "not this month" in page
            r = await client.post("/logout", data={"csrf": csrf})
            assert r.status_code == 303
            assert "rows for the monthly report" not in (await client.get("/")).text
        decisions = [e for e in gov.store.audit_tail(100) if e["action"] == "decision"]
        assert decisions[-1]["caller"] == "hospital (console)"
        assert {"console.login", "console.login_failed"} <= {e["action"] for e in gov.store.audit_tail(100)}


def test_training_runs_are_read_duck_typed():
    assert training_runs(None) == []
    runs = training_runs({"runs": [{"job": "j", "history": [{"round": 1, "loss": 2.0},
                                                            {"round": 2, "loss": float("nan")}]}]})
    assert runs == [("j", {"loss": [(1.0, 2.0)]})]
    assert training_runs(type("Ext", (), {"runs": {"a": _Run()}})())[0][0] == "births-logreg"


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and "
                    "chromium-driver (scripts/bootstrap.sh installs them as root)")
async def test_owner_approves_in_a_real_browser(tmp_path):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("P2PGRID_SCREENSHOTS") or tmp_path)
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        gov, rec, req = await _scene(grid)
        with pytest.raises(p2pgrid.PermissionDenied):
            await rec.get()
        url = gov.console_url

        def browse():
            with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
                driver = _driver(Path(profile))
                wait = WebDriverWait(driver, 20)
                try:
                    driver.get(url + "/")
                    assert "hospital" in driver.title
                    assert "rows for the monthly report" not in driver.page_source
                    driver.find_element(By.ID, "token").send_keys(gov.token)
                    driver.find_element(By.ID, "login").click()
                    row = wait.until(ec.presence_of_element_located((By.ID, f"req-{req.id}")))
                    assert "rows for the monthly report" in row.text
                    driver.set_window_size(1280, driver.execute_script(
                        "return document.body.scrollHeight") + 40)
                    driver.save_screenshot(str(shots / "console.png"))
                    row.find_element(By.NAME, "why").send_keys("fine for the report")
                    driver.find_element(By.ID, f"approve-{req.id}").click()
                    flash = wait.until(ec.presence_of_element_located((By.ID, "flash"))).text
                    assert f"Request {req.id} of bob approved" in flash
                    assert not driver.find_elements(By.ID, f"req-{req.id}")
                    driver.save_screenshot(str(shots / "console-approved.png"))
                finally:
                    driver.quit()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: trio.to_thread.run_sync(browse))
                await req.wait(timeout=60)
        assert req.approved and req.why == "fine for the report"
        assert torch.equal(await rec.get(), BIRTHS)
        assert (shots / "console.png").stat().st_size > 10_000
