"""The classroom load benchmark runs end to end on a small class (two students, a tiny live
run) and finds no error: no exception or traceback, no stuck page, no session seeing another's
step, test image or threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import classroom_load
from tests.test_e2e_browser import CHROMIUM

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)"),
]


def test_classroom_load_quick_run_writes_its_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "classroom_load.json"
    code = classroom_load.main(
        ["--sessions", "2", "--quick", "--timeout", "90", "--out", str(out)]
    )
    figures = json.loads(out.read_text())
    assert figures["errors"] == 0, figures["error_list"]
    assert code == 0
    assert figures["sessions"] == 2 and figures["quick"] is True
    assert figures["page_loads"] == figures["page_loads_expected"] == 2 * 14 + 1
    assert 0 < figures["p50_s"] <= figures["p95_s"] <= figures["max_s"]
    assert figures["independence_ok"] is True
    assert figures["server_peak_rss_mib"] > 0
    assert figures["worker_peak_rss_mib"] > 0  # the live run's worker was sampled
    run = figures["run"]
    assert run["id"] and run["state_at_students_start"].startswith("running")
    assert run["state_at_end"]
    for name in ["Teach: open", "Teach: test image", *(f"Teach: step {n}" for n in range(2, 6)),
                 *classroom_load.PAGES, "Feature variance: Threshold tab",
                 "Feature variance: threshold"]:  # fmt: skip
        assert figures["per_action"][name]["n"] >= 1, name
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("| sessions | page loads | p50 | p95 | max | errors |")
    assert lines[-1].startswith("| 2 | 29 of 29 |")
    assert out.with_suffix(".server.log").is_file()
