"""bench.variance_evidence: per-stage variance evidence and the two screens, on a tiny teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import variance_evidence


def test_rows_per_stage_and_the_screens(
    tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert variance_evidence.main([str(tiny_teacher), "--size", "200"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(f"| {tiny_teacher.stem} |")]
    stages = [row.split(" | ")[1] for row in rows]
    assert stages == ["block1", "block2", "block3", "screen"]  # the student's three stages
    for row in rows[:3]:
        flagged, highest, top = row.split(" | ")[2:5]
        assert " of " in flagged and float(highest) >= float(top.rstrip(" |")) > 0
    # 20 triggered suspect images: each screen says how many of them it withheld
    # the third: per class; the fourth: disputed labels; the fifth: their signature
    assert rows[3].count(" of 20 (") + rows[3].count("inactive") == 5


def test_a_missing_teacher_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert variance_evidence.main([str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
