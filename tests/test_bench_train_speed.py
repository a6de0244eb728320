"""The GPU speed benchmark's script runs end to end (tiny sizes, on the CPU) and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import train_speed


def test_train_speed_quick_run_writes_its_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = train_speed.main(
        ["--quick", "--device", "cpu", "--no-compile", "--workers", "0", "--out", str(tmp_path)]
    )
    assert code == 0
    figures = json.loads((tmp_path / "train_speed.json").read_text())
    for key in ("teacher_plain", "teacher_fast", "floor_eager", "distill_plain", "distill_fast"):
        assert figures[key] > 0, key
    assert figures["floor_graph"] is None  # CUDA graphs need a GPU: reported, not faked
    assert figures["facts"]["device"] == "CPU" and figures["facts"]["quick"] is True
    pipe = figures["pipeline"]
    assert pipe["seconds_total"] >= pipe["seconds_teacher"] > 0
    assert 0 <= pipe["student_acc"] <= 1 and 0 <= pipe["teacher_asr"] <= 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("| fashion-badnets pipeline end to end |")
    assert (tmp_path / "train_speed.log").read_text().splitlines()[-1] == out[-1]
    assert (tmp_path / "pipeline-teacher.safetensors").exists()
