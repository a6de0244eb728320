"""The package's front door: what ``robustkd/__init__.py`` promises a notebook user works."""

from __future__ import annotations

import contextlib
import io
import re

import robustkd


def test_every_exported_name_exists() -> None:
    assert robustkd.__all__ == sorted(robustkd.__all__, key=lambda n: (n[0].islower(), n))
    for name in robustkd.__all__:
        assert getattr(robustkd, name) is not None, name
    assert "robustkd" in robustkd.method_names() and "badnets" in robustkd.trigger_names()


def test_the_docstring_example_runs(monkeypatch) -> None:
    """The example of the package docstring, on a few hundred images (same calls, same order)."""
    code = re.search(r"::\n\n((?:    .*\n|\n)+)", robustkd.__doc__).group(1)
    code = "\n".join(line[4:] for line in code.splitlines())
    small = {
        "distill_size=2000)": "distill_size=300, trusted_size=100, test_size=300)",
        "DistillConfig(epochs=1)": 'DistillConfig(epochs=1, eval_size=100, device="cpu")',
    }
    for old, new in small.items():
        assert old in code, f"the docstring example changed; update this test's {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(robustkd.__file__.rsplit("/robustkd/", 1)[0])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "robustkd.__doc__", "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "acc" in lines[0].lower()  # the teacher's Evaluation
    acc, asr = (float(v) for v in lines[1].split())
    assert 0 <= acc <= 1 and 0 <= asr <= 1


def test_the_readme_shows_the_same_example() -> None:
    from pathlib import Path

    readme = (Path(robustkd.__file__).parents[1] / "README.md").read_text()
    first = re.search(r"## Library\n.*?```python\n(.*?)```", readme, re.S).group(1)
    code = re.search(r"::\n\n((?:    .*\n|\n)+)", robustkd.__doc__).group(1)
    assert first.strip() == "\n".join(line[4:] for line in code.splitlines()).strip()
