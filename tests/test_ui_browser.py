"""The web UI in a real browser (Debian's Chromium driven by Playwright) against the real
embedded server (``tensortrim serve``: SQLite, in-process worker, local storage) run as a
subprocess: sign in, upload and inspect a model, set a budget, follow the job live to
the end, see the charts, download the compressed model and run it; errors next to the
field at fault; another user's job is a 404 page. Screenshots of every page, at laptop
and phone widths, go to tests/artifacts/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

try:
    from tests.api_support import model_bytes
except ImportError:  # pytest run from inside tests/
    from api_support import model_bytes  # type: ignore[no-redef]

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = os.environ.get("TENSORTRIM_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(__file__).resolve().parent / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
JOB_TIMEOUT_MS = 150_000
LOGIN_URL = re.compile(r"/ui/login\?next=")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _create_keys(data: Path, secret: str, users: tuple[str, ...]) -> dict[str, str]:
    """What ``tensortrim keys create --user NAME`` does, in-process (the CLI takes seconds to start)."""
    from app.auth import create_key
    from app.db import make_engine, make_sessionmaker
    from app.models import User

    engine = make_engine(f"sqlite:///{data / 'tensortrim.db'}")
    keys = {}
    with make_sessionmaker(engine)() as s:
        for name in users:
            user = User(email=f"{name}@localhost")
            s.add(user)
            s.flush()
            keys[name] = create_key(s, user, secret=secret)[1]
        s.commit()
    engine.dispose()
    return keys


class Server:
    def __init__(self, url: str, keys: dict[str, str], data: Path) -> None:
        self.url, self.keys, self.data = url, keys, data

    def bearer(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("ui-data")
    secret = "ui-browser-test-secret-" + "s" * 32
    env = {**os.environ, "TENSORTRIM_MODE": "embedded", "TENSORTRIM_MIN_FREE_BYTES": "0",
           "TENSORTRIM_SECRET_KEY": secret}
    port = _free_port()
    log = (data / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + (data / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        yield Server(url, _create_keys(data, secret, ("alice", "bob")), data)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, base_url=server.url, accept_downloads=True)
    context.set_default_timeout(30_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ui-files")
    (d / "tiny.pt").write_bytes(model_bytes())
    (d / "garbage.pt").write_bytes(os.urandom(4096))
    return {"model": d / "tiny.pt", "garbage": d / "garbage.pt"}


def shoot(page: Any, name: str) -> None:
    """Screenshots at laptop and phone width; at the phone width nothing may overflow sideways."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for label, size in (("1280", LAPTOP), ("375", PHONE)):
        page.set_viewport_size(size)
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size({"width": 360, "height": 800})
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{name}: the page is {overflow}px wider than a 360px screen"
    page.set_viewport_size(LAPTOP)


def sign_in(page: Any, key: str) -> None:
    page.goto("/ui/jobs")
    page.wait_for_url(LOGIN_URL)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/jobs")


def upload_model(page: Any, path: Path, spec: str = "3,16,16") -> None:
    page.goto("/ui/jobs/new")
    page.get_by_label("TorchScript file").set_input_files(str(path))
    page.get_by_label("Input shape of one sample").fill(spec)
    page.get_by_role("button", name="Upload and inspect").click()


def test_sign_in_upload_compress_follow_and_download(page: Any, server: Server, files: dict[str, Path],
                                                     tmp_path: Path) -> None:
    import torch

    page.goto("/ui/jobs")
    page.wait_for_url(LOGIN_URL)
    page.get_by_label("API key").fill("tt_not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    assert "not valid" in page.locator("#api_key-error").inner_text()
    shoot(page, "login")
    sign_in(page, server.keys["alice"])

    upload_model(page, files["model"])
    rows = page.locator("#layer-table tbody tr")
    rows.first.wait_for()
    assert rows.count() == 3
    assert page.locator("#layer-table").get_by_text("conv1").count() == 1
    assert page.locator("#model-macs").inner_text().endswith("k")
    assert page.locator("#model-progress").get_attribute("value") == "100"

    page.get_by_label("Reduce").select_option("flops")
    page.get_by_label("Target").fill("2")
    preview = page.locator("#budget-preview").inner_text()
    assert preview.startswith("≈ ") and "MACs of" in preview and "2.0x fewer" in preview, preview
    page.get_by_label("Unit").select_option("%")
    page.get_by_label("Target").fill("50")
    assert "2.0x fewer" in page.locator("#budget-preview").inner_text()
    page.get_by_label("Unit").select_option("x")
    page.get_by_label("Target").fill("2")
    page.get_by_label("Uniform").check()
    page.locator("details.advanced summary").click()
    page.get_by_label("Also try budgets (optional)").fill("flops:3x, flops:4x")
    shoot(page, "new-job")

    events: list[str] = []
    page.on("request", lambda r: events.append(r.url) if r.url.endswith("/events") else None)
    page.get_by_role("button", name="Start compression").click()
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    # live: the SSE stream moves the page on; at the end it reloads with the results
    page.locator("#job-status", has_text="Done").wait_for(timeout=JOB_TIMEOUT_MS)
    page.locator("#macs-chart svg").wait_for()
    assert any(job_id in u for u in events), "the page followed the job over Server-Sent Events"
    assert page.locator("#ranks-chart svg rect").count() >= 2
    assert page.locator("#job-percent").inner_text() == "100 %"
    assert "÷ 2" in page.locator("#metrics-table").inner_text()
    # the sweep: one point per budget, the job's own (2x) and the two extra ones
    assert page.locator("#sweep-chart svg circle").count() == 3
    title = page.locator("#sweep-chart svg title").first.text_content() or ""
    assert "Agreement with the original against MACs" in title
    sweep_rows = page.locator("#sweep-table tbody tr")
    assert [sweep_rows.nth(i).locator("td").first.inner_text() for i in range(3)] == ["flops:2x", "flops:3x",
                                                                                     "flops:4x"]
    assert page.get_by_role("link", name="Download sweep.json", exact=True).count() == 1
    shoot(page, "job-done")

    with page.expect_download() as download:
        page.get_by_role("link", name="Download model.pt", exact=True).click()
    saved = tmp_path / "compressed.pt"
    download.value.save_as(saved)
    model = torch.jit.load(str(saved))
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10)

    page.goto("/ui/jobs")
    row = page.locator("table.jobs tbody tr").first
    assert "Done" in row.inner_text() and "tiny.pt" in row.inner_text()
    assert "fewer MACs" in row.inner_text()
    shoot(page, "jobs")
    # keyboard: Tab reaches the skip link first, then the navigation
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"


def test_bad_file_and_impossible_budget_show_next_to_their_fields(page: Any, server: Server,
                                                                  files: dict[str, Path]) -> None:
    sign_in(page, server.keys["alice"])
    upload_model(page, files["garbage"])
    error = page.locator("#model-file-error")
    error.wait_for()
    assert error.inner_text(), "the error explains what is wrong with the file"
    assert page.get_by_label("TorchScript file").get_attribute("aria-invalid") == "true"
    assert page.locator("#model-summary").is_hidden()
    shoot(page, "bad-file")

    upload_model(page, files["model"])
    page.locator("#layer-table tbody tr").first.wait_for()
    assert page.locator("#model-file-error").is_hidden()
    page.get_by_label("Target").fill("1000")
    page.get_by_role("button", name="Start compression").click()
    budget_error = page.locator("#budget-error")
    budget_error.wait_for()
    assert "cannot be met" in budget_error.inner_text()
    assert page.evaluate("document.activeElement.id") == "budget-target"
    assert "/ui/jobs/new" in page.url
    shoot(page, "impossible-budget")

    page.get_by_label("Target").fill("2")
    page.locator("details.advanced summary").click()
    page.get_by_label("Also try budgets (optional)").fill("flops:3x, flops:1000x")
    page.get_by_role("button", name="Start compression").click()
    sweep_error = page.locator("#sweep-error")
    sweep_error.wait_for()
    assert "'flops:1000x' in sweep" in sweep_error.inner_text() and "cannot be met" in sweep_error.inner_text()
    assert page.evaluate("document.activeElement.id") == "sweep"
    assert page.locator("#budget-error").is_hidden() and "/ui/jobs/new" in page.url


def test_manual_ranks_are_edited_checked_and_applied(page: Any, server: Server, files: dict[str, Path]) -> None:
    sign_in(page, server.keys["alice"])
    upload_model(page, files["model"])
    page.locator("#layer-table tbody tr").first.wait_for()
    assert page.locator("#manual-field").is_hidden()
    page.get_by_label("Manual").check()
    ranks = page.get_by_label("Ranks per layer (JSON)")
    assert json.loads(ranks.input_value()) == {"conv1": 0.5, "conv2": 0.5, "fc": 0.5}  # the starting point
    ranks.fill("{conv2: [4, 8]")
    page.get_by_role("button", name="Start compression").click()
    assert "JSON object" in page.locator("#ranks-error").inner_text()
    ranks.fill('{"conv2": [99, 8]}')
    page.get_by_role("button", name="Start compression").click()
    page.locator("#ranks-error", has_text="out of range").wait_for()
    assert page.evaluate("document.activeElement.id") == "ranks"
    shoot(page, "manual-ranks")
    ranks.fill('{"conv2": [4, 8]}')
    page.get_by_role("button", name="Start compression").click()
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    page.locator("#job-status", has_text="Done").wait_for(timeout=JOB_TIMEOUT_MS)
    page.locator("#ranks-chart svg").wait_for()
    assert "tucker2 · rank 4, 8" in page.locator("#ranks-chart").inner_text()


def test_another_users_job_is_not_reachable(page: Any, server: Server) -> None:
    alice = server.bearer("alice")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/api/v1/models", headers=alice, files={"file": ("a.pt", model_bytes())})
        assert r.status_code == 201, r.text
        r = c.post("/api/v1/jobs", headers=alice,
                   json={"model_id": r.json()["id"], "budget": "flops:1.5x", "input_spec": "3,16,16",
                         "method": "uniform"})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    sign_in(page, server.keys["bob"])
    response = page.goto(f"/ui/jobs/{job_id}")
    assert response.status == 404
    assert page.get_by_role("heading", name="Not found").is_visible()
    shoot(page, "not-found")
    response = page.goto(f"/ui/jobs/{job_id}/artifacts/model.pt")
    assert response.status == 404
    page.goto("/ui/jobs")
    assert job_id not in page.content()
