"""End to end in a real browser: Debian's Chromium, driven by Playwright, against
``streamlit run`` on a free local port. The newcomer journey, with a screenshot of each page
under test-artifacts/; any Streamlit exception or Python traceback on a page fails the test.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)"),
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Iterator[str]:
    port = _free_port()
    runs = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "ROBUSTKD_TEACHER": str(tiny_teacher), "ROBUSTKD_RUNS": str(runs)}
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not become healthy within 90 s")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser_page(server: str) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _settle(page) -> None:
    """Wait until Streamlit has finished running the script."""
    page.wait_for_timeout(300)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000
    )


def _check(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    assert page.locator('[data-testid="stException"]').count() == 0, f"exception on {name}"
    assert "Traceback" not in page.inner_text("body"), f"traceback on {name}"


def _goto(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=title).first.click()
    page.wait_for_selector(f"h1:has-text('{title}')")
    _settle(page)


def test_newcomer_journey(server: str, browser_page) -> None:
    page = browser_page
    page.goto(server)
    page.wait_for_selector("h1:has-text('Teacher')")
    _settle(page)
    page.wait_for_selector("text=Measured now")
    _check(page, "1-teacher")

    _goto(page, "Detox & distil")
    for label, value in (("Epochs", "1"), ("Distillation images", "300"),
                         ("Trusted clean images", "100")):  # fmt: skip
        box = page.get_by_label(label, exact=True)
        box.fill(value)
    page.get_by_role("button", name="Launch").click()
    page.wait_for_selector("text=Started run")
    deadline = time.time() + 240
    while time.time() < deadline and not page.locator("text=/done ·/").count():
        page.wait_for_timeout(1000)
    assert page.locator("text=/done ·/").count(), "the launched run did not finish"
    body = page.inner_text("body")
    assert re.search(r"robustkd", body)
    _check(page, "5-distil")
