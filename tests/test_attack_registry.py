"""A trigger added through the registry alone reaches the library, the CLI and the app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from streamlit.testing.v1 import AppTest

from robustkd.attacks import TRIGGERS, Trigger, create_trigger, trigger_from_dict, trigger_names
from robustkd.attacks.poison import poison_dataset
from robustkd.cli.main import main
from robustkd.data.datasets import ImageDataset

ROOT = Path(__file__).resolve().parent.parent
BUILT_IN = ["badnets", "blend", "sig", "wanet", "custom", "optimized-blend"]


class ToyBand(Trigger):
    """A bright horizontal band of ``rows`` rows at the top of the image."""

    name = "toy-band"

    def __init__(self, rows: int = 2) -> None:
        super().__init__()
        self.rows = int(rows)

    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        out[:, :, : self.rows, :] = 1.0
        return out

    def params(self) -> dict[str, Any]:
        return {"rows": self.rows}


@pytest.fixture()
def toy() -> Iterator[None]:
    TRIGGERS.register("toy-band")(ToyBand)
    try:
        yield
    finally:
        TRIGGERS.unregister("toy-band")
    assert "toy-band" not in trigger_names()


def test_built_in_triggers_one_module_each() -> None:
    assert sorted(trigger_names()) == sorted(BUILT_IN)
    for name in BUILT_IN:
        cls = TRIGGERS.get(name)
        module = name.replace("-", "_")  # a module name cannot hold a hyphen
        assert cls.name == name and cls.__module__ == f"robustkd.attacks.{module}"


@pytest.mark.usefixtures("toy")
def test_a_registered_trigger_is_known_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    assert "toy-band" in trigger_names()
    trigger = create_trigger("toy-band", rows=3)
    assert trigger_from_dict(trigger.to_dict()).params() == {"rows": 3}
    images = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
    data = ImageDataset(images, torch.arange(20) % 2, ("a", "b"), (0.5,), (0.5,), "toy")
    planted = poison_dataset(data, trigger, 0.5, target=0)
    stamped = planted.dataset.images[planted.poisoned_indices]
    assert len(planted.poisoned_indices) == 10 and bool((stamped[:, :, :3] == 255).all())
    assert bool((planted.dataset.labels[planted.poisoned_indices] == 0).all())
    assert main(["list", "triggers"]) == 0
    assert "toy-band" in capsys.readouterr().out


@pytest.mark.usefixtures("toy")
def test_a_registered_trigger_is_offered_on_the_triggers_page(
    tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.run()
    at.switch_page(str(ROOT / "pages" / "triggers.py")).run()
    assert not at.exception
    picker = at.selectbox(key="trig_name")
    assert "toy-band" in picker.options
    picker.set_value("toy-band").run()
    assert not at.exception and not at.error
    assert any("ToyBand(rows=2)" in c.value for c in at.caption)
