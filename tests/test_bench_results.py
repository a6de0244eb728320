"""The results benchmark's table: one seed as measured, several as mean ± std."""

from __future__ import annotations

from bench.results import table


def _report(acc: float, asr: float, flagged: int) -> dict:
    return {
        "teacher": {"acc": 0.93, "asr": 0.99},
        "methods": {
            "feature-kd": {"acc": acc, "asr": 0.8, "der": 0.5},
            "robustkd": {
                "acc": acc + 0.01,
                "asr": asr,
                "der": 0.9,
                "flagged_samples": flagged,
                "screen_recall": 1.0,
                "screen_precision": 0.9,
            },
        },
    }


def test_one_seed_shows_the_values() -> None:
    text = table({"main": [_report(0.85, 0.02, 2000)]})
    assert "| | robustkd | 86.0 | 2.0 | 0.900 | 2000 (100.0 / 90.0) |" in text
    assert "±" not in text


def test_several_seeds_show_mean_and_sample_std() -> None:
    text = table({"main": [_report(0.84, 0.01, 2000), _report(0.86, 0.03, 2100)]})
    assert "over 2 seeds" in text
    # ACC 86 ± 1.41 (sample std of 85, 87), ASR 2 ± 1.41, flagged averaged
    row = "| | robustkd | 86.0 ± 1.4 | 2.0 ± 1.4 | 0.900 | 2050 (100.0 ± 0.0 / 90.0 ± 0.0) |"
    assert row in text
    assert "| teacher | 93.0 ± 0.0 | 99.0 ± 0.0 |" in text
