"""End to end in a real browser: Debian's Chromium, driven by Playwright, against
``streamlit run`` on a free local port. The newcomer journey, with a screenshot of each page
under test-artifacts/; any Streamlit exception or Python traceback on a page fails the test.
"""

from __future__ import annotations

import os
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


def serve(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``streamlit run app/main.py`` as `make run` does, on a free port, with ``env``; yields
    its address once healthy and stops it afterwards. Its output goes to ``log_path``."""
    port = _free_port()
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py",
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
        log.close()
        pytest.fail("streamlit did not become healthy within 90 s")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Iterator[str]:
    runs = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "ROBUSTKD_TEACHER": str(tiny_teacher), "ROBUSTKD_RUNS": str(runs)}
    yield from serve(env, tmp_path_factory.mktemp("log") / "streamlit.log")


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


def _slider(page, label: str, key: str) -> None:
    """Move a Streamlit slider with the keyboard (as a user tabbing to it would)."""
    block = page.locator('[data-testid="stSlider"]').filter(has_text=label).first
    thumb = block.locator('input[type="range"], [role="slider"]').first
    thumb.focus()
    thumb.press(key)


def _metric(page, label: str) -> str:
    return page.locator('[data-testid="stMetric"]').filter(has_text=label).first.inner_text()


def test_newcomer_journey(server: str, browser_page) -> None:
    page = browser_page
    page.goto(server)
    page.wait_for_selector("h1:has-text('Teacher')")
    _settle(page)
    page.wait_for_selector("text=Measured now")
    _check(page, "1-teacher")

    _goto(page, "Triggers")
    page.wait_for_selector("text=/flipped to class/")
    before = page.inner_text("body")
    _slider(page, "Patch size", "ArrowRight")  # stamp a bigger patch
    page.wait_for_function("b => document.body.innerText !== b", arg=before, timeout=60_000)
    _settle(page)
    _check(page, "2-triggers")

    _goto(page, "Feature variance")
    page.wait_for_selector("text=Per channel, and per position")
    page.get_by_role("tab", name="Threshold").click()
    page.wait_for_selector("text=Flagged units")
    before = _metric(page, "Flagged units")
    _slider(page, "Variance threshold (log scale)", "Home")  # the lowest threshold
    page.wait_for_function(
        "([label, b]) => { const m = [...document.querySelectorAll('[data-testid=stMetric]')]"
        ".find(e => e.innerText.includes(label)); return m && !m.innerText.includes(b); }",
        arg=["Flagged units", before],
        timeout=60_000,
    )
    _settle(page)
    assert _metric(page, "Flagged units") != before
    _check(page, "3-variance")

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
    # the report table's rows
    page.wait_for_function(
        "() => /\\nrobustkd\\t/.test(document.body.innerText)"
        " && /\\nfeature-kd\\t/.test(document.body.innerText)",
        timeout=30_000,
    )
    _check(page, "5-distil")

    _goto(page, "Compare")
    page.wait_for_selector('[data-testid="stPlotlyChart"]')
    _settle(page)
    body = page.inner_text("body")
    assert "robustkd" in body and "feature-kd" in body
    # the page draws its charts one after the other; a loaded server takes its time
    page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length >= 2",
        timeout=60_000,
    )
    _check(page, "6-compare")
