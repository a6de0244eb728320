"""The Teach page's lesson in a real browser, at a projector's size (1280×720): Debian's
Chromium, driven by Playwright, against ``streamlit run`` on the shipped teacher and the shipped
students. Walks the five steps with "Next step", a screenshot of each under
test-artifacts/lesson-<n>.png; changes the test image in step 1; downloads the one-page handout.
Any Streamlit exception or Python traceback fails the test.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from robustkd.experiments.lesson import LESSON_DIR, STEP_TITLES, lesson_sentences, load_lesson
from robustkd.models.checkpoints import DEFAULT_TEACHER, read_metadata
from tests.test_e2e_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, _check, serve

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)"),
]
STEPS = list(STEP_TITLES)
CHARTS = [1, 2, 2, 2, 1]  # Plotly charts each step draws
# The script has finished: not running, nothing stale left, the step's header and its charts.
STEP_DONE = """([header, charts]) => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.dataset.testScriptState !== 'notRunning') return false;
  if (document.querySelector('[data-testid="stStatusWidget"], [data-stale="true"]')) return false;
  if (![...document.querySelectorAll('h2')].some(h => h.innerText.trim() === header)) return false;
  return [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
    .filter(c => c.querySelector('.main-svg')).length >= charts;
}"""


@pytest.fixture(scope="module")
def lesson_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app on the shipped teacher and lesson; runs go to a temporary folder."""
    env = {**os.environ, "ROBUSTKD_RUNS": str(tmp_path_factory.mktemp("runs"))}
    env.pop("ROBUSTKD_TEACHER", None)
    log_path = tmp_path_factory.mktemp("log") / "streamlit.log"
    yield from serve(env, log_path)
    assert "Traceback" not in log_path.read_text(errors="replace"), "the server logged a traceback"


def _step_done(page: Any, n: int) -> None:
    page.wait_for_timeout(200)
    page.wait_for_function(STEP_DONE, arg=[STEPS[n], CHARTS[n]], timeout=120_000, polling=100)


def _to_top(page: Any) -> None:
    """Scroll the page back to its top: what the room sees when a step opens."""
    page.evaluate(
        "() => document.querySelectorAll('*').forEach(e => { if (e.scrollTop) e.scrollTop = 0; })"
    )
    page.wait_for_timeout(200)


def _first_chart_text(page: Any) -> str:
    return page.locator('[data-testid="stPlotlyChart"]').first.inner_text()


def test_lesson_walk_at_projector_size(lesson_server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    meta = read_metadata(DEFAULT_TEACHER)
    sentences = lesson_sentences(load_lesson(LESSON_DIR), meta.get("classes") or [],
                                 meta.get("target"))  # fmt: skip
    step2_first = sentences[1][0]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720}, accept_downloads=True)
            page.set_default_timeout(60_000)
            page.goto(f"{lesson_server}/teach")
            page.wait_for_selector("h1:has-text('Teach')")
            _step_done(page, 0)
            assert page.get_by_role("button", name="Back").is_disabled()

            # step 1: another test image draws another picture
            before = _first_chart_text(page)
            box = page.get_by_label("Test image", exact=True)
            box.fill("7")
            box.press("Enter")
            page.wait_for_function(
                "b => { const c = document.querySelector('[data-testid=\"stPlotlyChart\"]');"
                " return c && c.innerText !== b; }",
                arg=before,
                timeout=60_000,
            )
            _step_done(page, 0)
            assert box.input_value() == "7"
            assert "teacher says" in _first_chart_text(page)

            # the handout: one HTML page with every step's sentences
            with page.expect_download(timeout=120_000) as info:
                page.get_by_role("button", name="Download the lesson (one-page HTML)").click()
            download = info.value
            assert download.suggested_filename.endswith(".html")
            target = tmp_path / download.suggested_filename
            download.save_as(target)
            handout = target.read_text(encoding="utf-8")
            assert "<html" in handout
            assert step2_first in html.unescape(handout)
            _to_top(page)
            _check(page, "lesson-1")

            for n in range(1, len(STEPS)):
                page.get_by_role("button", name="Next step").click()
                _step_done(page, n)
                if n == 1:  # the sentence the handout carries is the one on the screen
                    assert step2_first in page.inner_text("body")
                _to_top(page)
                _check(page, f"lesson-{n + 1}")
            assert page.get_by_role("button", name="Next step").is_disabled()
            assert page.locator('[data-testid="stDataFrame"]').count() == 1  # step 5's table
        finally:
            browser.close()
    assert (ARTIFACTS / "lesson-5.png").is_file()
