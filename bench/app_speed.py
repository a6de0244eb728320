"""Dashboard speed on the shipped teacher, in Debian's Chromium driven by Playwright.

    python -m bench.app_speed [--repeats 5]

Measures: first page rendered after the server is healthy; switching pages once warm (every
page visited once first, then ``--repeats`` rounds through all seven, each switch timed from
the click until the page's script has finished); opening the Feature variance page's
Threshold tab; the threshold slider's round trip (key press in the browser → updated
preview). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.classroom_load import CHROMIUM, CHROMIUM_ARGS, PAGES, _port, _wait_healthy

ROOT = Path(__file__).resolve().parent.parent
# the page's script has finished: the app says it is not running, no status widget, and
# nothing left over from the page before (stale elements)
DONE = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.dataset.testScriptState !== 'notRunning') return false;
  return !document.querySelector('[data-testid="stStatusWidget"], [data-stale="true"]');
}"""


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    port = _port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ROBUSTKD_RUNS": tempfile.mkdtemp(prefix="robustkd-bench-")}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app/main.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows: list[tuple[str, float, str]] = []
    try:
        _wait_healthy(url, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            t = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("text=Measured now")
            page.wait_for_function(DONE)
            rows.append(("first page (Teacher) after healthy", time.perf_counter() - t, "s"))

            nav = page.locator('[data-testid="stSidebarNav"] a')

            def visit(title: str) -> float:
                t = time.perf_counter()
                nav.filter(has_text=title).first.click()
                page.wait_for_selector(f"h1:has-text('{title}')")
                page.wait_for_function(DONE)
                return time.perf_counter() - t

            for title in PAGES:  # each page once: caches filled, the app warm
                visit(title)
            per_page: dict[str, list[float]] = {title: [] for title in PAGES}
            for _ in range(args.repeats):
                for title in PAGES:
                    per_page[title].append(visit(title))
            switches = [t for times in per_page.values() for t in times]
            median = statistics.median(switches)
            rows.append(("page switch, warm (median over every page)", median, "s"))
            rows.append(("page switch, warm (slowest)", max(switches), "s"))
            for title, times in per_page.items():
                rows.append((f"switch to {title} (median)", statistics.median(times), "s"))

            tabs = []
            for _ in range(args.repeats):  # the page opens on its first tab
                nav.filter(has_text="Feature variance").first.click()
                page.wait_for_selector("h1:has-text('Feature variance')")
                page.wait_for_function(DONE)
                t = time.perf_counter()
                page.get_by_role("tab", name="Threshold").click()
                page.wait_for_selector("text=Flagged units")
                page.wait_for_function(DONE)
                tabs.append(time.perf_counter() - t)
                nav.filter(has_text="Teacher").first.click()
                page.wait_for_selector("h1:has-text('Teacher')")
                page.wait_for_function(DONE)
            rows.append(("Feature variance: open the Threshold tab (median)",
                         statistics.median(tabs), "s"))  # fmt: skip
            nav.filter(has_text="Feature variance").first.click()
            page.get_by_role("tab", name="Threshold").click()
            page.wait_for_selector("text=Flagged units")
            page.wait_for_function(DONE)
            thumb = (
                page.locator('[data-testid="stSlider"]')
                .filter(has_text="Variance threshold")
                .first.locator('input[type="range"], [role="slider"]')
                .first
            )
            caption = page.locator('[data-testid="stCaptionContainer"]').filter(
                has_text="Flagged at threshold"
            )
            trips = []
            for i in range(2 * args.repeats):
                before = caption.first.inner_text()  # names the threshold: changes every step
                thumb.focus()
                t = time.perf_counter()
                thumb.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
                page.wait_for_function(
                    "([b]) => [...document.querySelectorAll('[data-testid=stCaptionContainer]')]"
                    ".some(e => e.innerText.includes('Flagged at threshold') && e.innerText !== b)",
                    arg=[before],
                )
                page.wait_for_function(DONE)
                trips.append(time.perf_counter() - t)
            rows.append(("threshold slider round trip (median)", statistics.median(trips), "s"))
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    print("| measurement | value |")
    print("| --- | --- |")
    for name, value, unit in rows:
        print(f"| {name} | {value:.2f} {unit} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
