"""Triggers: shape/dtype/range contracts, each trigger's formula, serialisation and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from robustkd.attacks import (
    TRIGGERS,
    BadNetsTrigger,
    BlendTrigger,
    CustomTrigger,
    OptimizedBlendTrigger,
    SIGTrigger,
    Trigger,
    WaNetTrigger,
    create_trigger,
    trigger_from_dict,
    trigger_names,
)
from robustkd.errors import ConfigError, DataError, UnknownNameError

SHAPES = [(4, 1, 28, 28), (4, 3, 32, 32)]
NAMES = ["badnets", "badnets-checkerboard", "blend", "sig", "wanet", "custom", "optimized-blend"]


def _images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    # kept away from 0 and 1 so no stamp is hidden by clamping or by an already-white pixel
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    mode = {2: "L", 3: "RGB"}[pixels.ndim] if pixels.ndim == 2 or pixels.shape[2] == 3 else "RGBA"
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.fixture(scope="module")
def pattern_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16×16 RGBA PNG: an opaque red 6×6 square on a transparent background."""
    px = np.zeros((16, 16, 4), dtype=np.uint8)
    px[4:10, 4:10] = [255, 0, 0, 255]
    return _write_png(tmp_path_factory.mktemp("pattern") / "pattern.png", px)


def _make(name: str, pattern: Path) -> Trigger:
    if name == "badnets-checkerboard":
        return create_trigger("badnets", size=4, pattern="checkerboard", position="top-left")
    if name == "custom":
        return create_trigger("custom", pattern_path=str(pattern))
    if name == "optimized-blend":  # learned, so built from pixels (a seeded stand-in here)
        g = torch.Generator().manual_seed(0)
        return OptimizedBlendTrigger.from_tensors(
            torch.rand(3, 16, 16, generator=g), 0.05 + 0.15 * torch.rand(16, 16, generator=g)
        )
    return create_trigger(name)


# --------------------------------------------------------------------------- common contract


def test_registry_lists_all_triggers() -> None:
    assert set(trigger_names()) == {"badnets", "blend", "sig", "wanet", "custom", "optimized-blend"}
    for name in trigger_names():
        assert TRIGGERS.get(name).name == name


@pytest.mark.parametrize("shape", SHAPES, ids=["gray28", "rgb32"])
@pytest.mark.parametrize("name", NAMES)
def test_apply_keeps_shape_dtype_range_and_changes_image(
    name: str, shape: tuple[int, ...], pattern_png: Path
) -> None:
    trigger = _make(name, pattern_png)
    x = _images(shape)
    before = x.clone()
    out = trigger.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(x, before), "apply modified its input in place"
    # a single (C, H, W) image gives the same as a batch of one
    torch.testing.assert_close(trigger.apply(x[1]), out[1], rtol=0, atol=1e-6)
    # the result is clamped even for inputs at the edges of [0, 1]
    for edge in (torch.zeros(shape), torch.ones(shape)):
        y = trigger.apply(edge)
        assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_float64_and_half_inputs_keep_their_dtype(name: str, pattern_png: Path) -> None:
    trigger = _make(name, pattern_png)
    x = _images((2, 3, 32, 32))
    ref = trigger.apply(x)
    for dtype in (torch.float64, torch.float16):
        out = trigger.apply(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_dict_round_trip_through_json_is_exact(name: str, pattern_png: Path) -> None:
    trigger = _make(name, pattern_png)
    d = trigger.to_dict()
    assert d["name"] == trigger.name
    d2 = json.loads(json.dumps(d))
    assert d2 == d
    rebuilt = trigger_from_dict(d2, allow_paths=True)  # a path the user gave, not a file's
    assert type(rebuilt) is type(trigger) and rebuilt.to_dict() == d
    for shape in SHAPES:
        x = _images(shape, seed=1)
        assert torch.equal(rebuilt.apply(x), trigger.apply(x))


def test_uint8_or_badly_shaped_input_is_rejected() -> None:
    trigger = BadNetsTrigger()
    with pytest.raises(DataError, match="to_float"):
        trigger.apply(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(DataError, match="shaped"):
        trigger.apply(torch.zeros(28, 28))


def test_empty_batch() -> None:
    out = WaNetTrigger().apply(torch.zeros(0, 3, 32, 32))
    assert out.shape == (0, 3, 32, 32)


# --------------------------------------------------------------------------- BadNets


@pytest.mark.parametrize(
    ("position", "rows", "cols"),
    [
        ("bottom-right", (24, 27), (24, 27)),
        ("top-left", (1, 4), (1, 4)),
        ("top-right", (1, 4), (24, 27)),
        ("bottom-left", (24, 27), (1, 4)),
        ("center", (12, 15), (12, 15)),
        ([5, 7], (5, 8), (7, 10)),
    ],
)
def test_badnets_changes_exactly_the_patch(position: object, rows: tuple, cols: tuple) -> None:
    trigger = create_trigger("badnets", size=3, position=position, value=1.0, margin=1)
    x = _images((4, 3, 28, 28))
    out = trigger.apply(x)
    changed = (out != x).any(dim=0).any(dim=0)
    expected = torch.zeros(28, 28, dtype=torch.bool)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert torch.equal(changed, expected)
    assert torch.equal(trigger.region_mask(28, 28), expected)
    assert torch.all(out[:, :, rows[0] : rows[1], cols[0] : cols[1]] == 1.0)


def test_badnets_margin_value_and_checkerboard() -> None:
    trigger = BadNetsTrigger(
        size=4, position="top-left", pattern="checkerboard", value=0.75, margin=0
    )
    out = trigger.apply(_images((1, 1, 10, 10)))[0, 0, :4, :4]
    expected = torch.tensor([[0.75, 0.25] * 2, [0.25, 0.75] * 2] * 2)
    assert torch.equal(out, expected)
    assert trigger.region_mask(10, 10)[:4, :4].all() and trigger.region_mask(10, 10).sum() == 16


def test_badnets_patch_that_does_not_fit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        BadNetsTrigger(size=8, margin=1).apply(torch.rand(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="does not fit"):
        BadNetsTrigger(size=3, position=[6, 0]).region_mask(8, 8)


# --------------------------------------------------------------------------- Blend


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_blend_noise_follows_the_formula(alpha: float) -> None:
    trigger = BlendTrigger(alpha=alpha, seed=3)
    x = _images((4, 3, 32, 32))
    pattern = trigger.pattern(3, 32, 32)
    assert pattern.shape == (3, 32, 32) and pattern.min() >= 0 and pattern.max() <= 1
    torch.testing.assert_close(trigger.apply(x), (1 - alpha) * x + alpha * pattern)
    assert torch.equal(BlendTrigger(alpha=alpha, seed=3).pattern(3, 32, 32), pattern)
    assert not torch.equal(BlendTrigger(alpha=alpha, seed=4).pattern(3, 32, 32), pattern)


def test_blend_image_file_pattern(tmp_path: Path) -> None:
    px = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = _write_png(tmp_path / "hello-kitty.png", px)
    trigger = BlendTrigger(alpha=0.2, pattern_path=path)
    x = _images((2, 3, 32, 32))
    p = torch.from_numpy(px).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(trigger.apply(x), 0.8 * x + 0.2 * p)
    gray = trigger.apply(_images((2, 1, 28, 28)))  # resized and converted to one channel
    assert gray.shape == (2, 1, 28, 28)


# --------------------------------------------------------------------------- SIG


@pytest.mark.parametrize(("amplitude", "frequency"), [(20.0, 6.0), (40.0, 3.0)])
def test_sig_adds_a_column_sinusoid(amplitude: float, frequency: float) -> None:
    x = _images((4, 3, 32, 32)) * 0.6 + 0.2  # in [0.26, 0.74]: no clamping at ±40/255
    out = SIGTrigger(amplitude=amplitude, frequency=frequency).apply(x)
    j = torch.arange(32, dtype=torch.float64)
    wave = (amplitude / 255 * torch.sin(2 * math.pi * j * frequency / 32)).float()
    torch.testing.assert_close(out - x, wave.expand_as(x), rtol=0, atol=1e-6)


def test_sig_clamps() -> None:
    out = SIGTrigger(amplitude=255).apply(torch.ones(1, 1, 8, 8))
    assert out.max() == 1.0 and out.min() < 1.0


# --------------------------------------------------------------------------- WaNet


def test_wanet_is_deterministic_per_seed() -> None:
    x = _images((4, 3, 32, 32))
    a = WaNetTrigger(seed=1).apply(x)
    assert torch.equal(a, WaNetTrigger(seed=1).apply(x))
    assert not torch.allclose(a, WaNetTrigger(seed=2).apply(x), atol=1e-3)


def test_wanet_with_zero_strength_is_the_identity() -> None:
    x = _images((4, 1, 28, 28))
    torch.testing.assert_close(WaNetTrigger(strength=0.0).apply(x), x, rtol=0, atol=1e-5)


def test_wanet_warp_is_small_and_smooth() -> None:
    # a horizontal ramp moves by at most ~strength·max|flow| pixels, never across the image
    ramp = torch.linspace(0, 1, 32).expand(1, 1, 32, 32).contiguous()
    out = WaNetTrigger(strength=0.5).apply(ramp)
    assert (out - ramp).abs().max() < 4 / 31


def test_wanet_noise_mode() -> None:
    trigger = WaNetTrigger(seed=0, noise_rate=0.2)
    x = _images((4, 3, 32, 32))
    before = x.clone()
    a = trigger.apply_noise(x, torch.Generator().manual_seed(5))
    b = trigger.apply_noise(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(x, before)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, trigger.apply(x), atol=1e-3)
    assert not torch.equal(a, trigger.apply_noise(x, torch.Generator().manual_seed(6)))


# --------------------------------------------------------------------------- custom


def test_custom_trigger_from_rgba_png(pattern_png: Path) -> None:
    trigger = CustomTrigger(pattern_path=pattern_png)
    x = _images((2, 3, 16, 16))
    out = trigger.apply(x)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:10, 4:10] = True
    assert torch.equal(trigger.region_mask(16, 16), inside)
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)
    assert torch.equal(out[:, :, inside], red.expand(2, 3, 36))
    # resized: the mask covers the same fraction of a 32×32 image
    assert trigger.region_mask(32, 32).sum() == 144


def test_custom_trigger_embedded_keeps_pixels_not_paths(pattern_png: Path, tmp_path) -> None:
    copy = tmp_path / "p.png"
    copy.write_bytes(pattern_png.read_bytes())
    trigger = CustomTrigger(pattern_path=copy)
    stored = trigger.embedded().to_dict()
    copy.unlink()  # an imported teacher must not need the file any more
    assert "pattern_path" not in stored and stored["pattern_png"]
    rebuilt = trigger_from_dict(stored)
    for shape in SHAPES:
        x = _images(shape)
        assert torch.equal(rebuilt.apply(x), trigger.apply(x))


def test_custom_trigger_mask_rules(tmp_path: Path) -> None:
    px = np.zeros((8, 8, 3), dtype=np.uint8)
    px[0, 0] = [10, 0, 0]  # not black → in the mask
    pattern = _write_png(tmp_path / "p.png", px)
    assert CustomTrigger(pattern_path=pattern).region_mask(8, 8).sum() == 1
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:4, 2:5] = 255
    trigger = CustomTrigger(pattern_path=pattern, mask_path=_write_png(tmp_path / "m.png", mask))
    assert torch.equal(trigger.region_mask(8, 8), torch.from_numpy(mask > 0))
    x = _images((1, 1, 8, 8))
    assert torch.equal(trigger.apply(x)[0, 0, 2:4, 2:5], torch.zeros(2, 3))


def test_custom_trigger_from_arrays_matches_file(pattern_png: Path) -> None:
    with Image.open(pattern_png) as im:
        px = np.array(im)
    from_numpy = CustomTrigger.from_arrays(px)
    from_tensor = CustomTrigger.from_arrays(torch.from_numpy(px).permute(2, 0, 1).float() / 255)
    from_file = CustomTrigger(pattern_path=pattern_png)
    x = _images((2, 3, 24, 24))
    assert torch.equal(from_numpy.apply(x), from_file.apply(x))
    assert torch.equal(from_tensor.apply(x), from_file.apply(x))
    mask = np.zeros((16, 16), dtype=bool)
    mask[0:2, 0:2] = True
    masked = CustomTrigger.from_arrays(px[:, :, :3], mask)
    assert torch.equal(masked.region_mask(16, 16), torch.from_numpy(mask))


def test_corrupt_or_missing_image_file_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    for make in (
        lambda p: CustomTrigger(pattern_path=p),
        lambda p: BlendTrigger(pattern_path=p),
        lambda p: trigger_from_dict({"name": "custom", "pattern_path": str(p)}, allow_paths=True),
    ):
        with pytest.raises(DataError, match=r"broken\.png"):
            make(bad)
        with pytest.raises(DataError, match="does not exist"):
            make(tmp_path / "missing.png")


def test_custom_trigger_invalid_arrays() -> None:
    with pytest.raises(DataError):
        CustomTrigger.from_arrays(np.zeros((8, 8, 5), dtype=np.uint8) + 1)
    with pytest.raises(DataError, match="floats in"):
        CustomTrigger.from_arrays(np.full((8, 8), 2.0))
    with pytest.raises(DataError, match="selects no pixels"):
        CustomTrigger.from_arrays(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ConfigError):
        CustomTrigger()


# --------------------------------------------------------------------------- errors


def test_unknown_trigger_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_trigger("trojan-horse")
    for name in trigger_names():
        assert name in str(info.value)
    with pytest.raises(UnknownNameError):
        trigger_from_dict({"name": "trojan-horse"})


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("blend", {"alpha": 0}),
        ("blend", {"alpha": 1.5}),
        ("blend", {"alpha": float("nan")}),
        ("blend", {"seed": -1}),
        ("badnets", {"size": 0}),
        ("badnets", {"size": 2.5}),
        ("badnets", {"position": "middle"}),
        ("badnets", {"position": [1, -1]}),
        ("badnets", {"pattern": "stripes"}),
        ("badnets", {"value": 1.2}),
        ("badnets", {"margin": -1}),
        ("sig", {"amplitude": 0}),
        ("sig", {"amplitude": 300}),
        ("sig", {"frequency": -2}),
        ("wanet", {"strength": -0.1}),
        ("wanet", {"grid_size": 1}),
        ("wanet", {"noise_rate": 1.0}),
        ("wanet", {"seed": True}),
        ("wanet", {"strenght": 0.5}),
    ],
)
def test_bad_parameters_are_config_errors(name: str, params: dict) -> None:
    with pytest.raises(ConfigError) as info:
        create_trigger(name, **params)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


def test_malformed_dict_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        trigger_from_dict({"alpha": 0.1})


# --------------------------------------------------------------------------- properties

_SHAPES = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(8, 40), st.integers(8, 40))


def _check_contract(trigger: Trigger, shape: tuple[int, int, int, int], seed: int) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    before = x.clone()
    out = trigger.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, before)
    mask = trigger.region_mask(shape[2], shape[3])
    assert mask.shape == shape[2:] and mask.dtype == torch.bool
    # nothing changes outside the trigger's region
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])


@settings(max_examples=25, deadline=None)
@given(
    shape=_SHAPES,
    seed=st.integers(0, 1000),
    size=st.integers(1, 6),
    position=st.sampled_from(["bottom-right", "top-left", "top-right", "bottom-left", "center"]),
)
def test_property_badnets(shape: tuple, seed: int, size: int, position: str) -> None:
    _check_contract(BadNetsTrigger(size=size, position=position), shape, seed)


@settings(max_examples=25, deadline=None)
@given(shape=_SHAPES, seed=st.integers(0, 1000), alpha=st.floats(0.01, 1.0))
def test_property_blend(shape: tuple, seed: int, alpha: float) -> None:
    _check_contract(BlendTrigger(alpha=alpha, seed=seed), shape, seed)


@settings(max_examples=25, deadline=None)
@given(
    shape=_SHAPES,
    seed=st.integers(0, 1000),
    amplitude=st.floats(1, 255),
    frequency=st.floats(0.5, 12),
)
def test_property_sig(shape: tuple, seed: int, amplitude: float, frequency: float) -> None:
    _check_contract(SIGTrigger(amplitude=amplitude, frequency=frequency), shape, seed)


@settings(max_examples=25, deadline=None)
@given(
    shape=_SHAPES, seed=st.integers(0, 1000), strength=st.floats(0, 2), grid_size=st.integers(2, 8)
)
def test_property_wanet(shape: tuple, seed: int, strength: float, grid_size: int) -> None:
    trigger = WaNetTrigger(seed=seed, strength=strength, grid_size=grid_size)
    _check_contract(trigger, shape, seed)
    noisy = trigger.apply_noise(torch.rand(shape), torch.Generator().manual_seed(seed))
    assert noisy.shape == shape and noisy.min() >= 0 and noisy.max() <= 1


@settings(max_examples=25, deadline=None)
@given(
    shape=_SHAPES,
    seed=st.integers(0, 1000),
    src=st.tuples(st.integers(2, 20), st.integers(2, 20), st.sampled_from([1, 3, 4])),
)
def test_property_custom(shape: tuple, seed: int, src: tuple) -> None:
    h, w, c = src
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    pixels[0, 0] = 255  # at least one visible, opaque pixel
    _check_contract(CustomTrigger.from_arrays(pixels), shape, seed)
