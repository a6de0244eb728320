"""Uploaded-image reading, top-k / flip helpers, variance figures, and the Triggers and
Feature variance pages driven headless through AppTest on the tiny teacher."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from robustkd.analysis.features import LayerStats
from robustkd.analysis.metrics import evaluate, predict
from robustkd.analysis.predictions import flip_grid, top_k_predictions
from robustkd.attacks import create_trigger, trigger_names
from robustkd.data.datasets import ImageDataset
from robustkd.data.images import read_image, to_display
from robustkd.defenses import detox
from robustkd.defenses.detox import DetoxPreview, LayerFit, Preview
from robustkd.errors import ConfigError, DataError
from robustkd.models import create_model
from robustkd.models.checkpoints import load_checkpoint
from robustkd.viz.variance_figures import (
    activation_maps_figure,
    channel_variance_figure,
    compare_layer,
    flagged_units_figure,
    ranked_channels_figure,
    spatial_variance_figure,
)
from tests.conftest import ROOT

MAIN = ROOT / "app" / "main.py"

# --------------------------------------------------------------------------- images


def _encode(image: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pixels(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) float → uint8 (H, W, C), exact for 8-bit inputs."""
    return np.rint(t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _rgb(h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith(".") and "Traceback" not in msg
    return msg


def test_png_rgb_is_read_exactly_without_notes() -> None:
    px = _rgb()
    img, notes = read_image(_encode(Image.fromarray(px)), 3, (28, 28))
    assert img.shape == (3, 28, 28) and img.dtype == torch.float32
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert np.array_equal(_pixels(img), px) and notes == []


def test_grayscale_png_for_a_grey_model() -> None:
    px = _rgb()[:, :, 0]
    img, notes = read_image(_encode(Image.fromarray(px, "L")), 1, (28, 28))
    assert img.shape == (1, 28, 28) and np.array_equal(_pixels(img)[:, :, 0], px)
    assert notes == []


def test_rgba_is_composited_on_black() -> None:
    px = np.zeros((28, 28, 4), np.uint8)
    px[..., :3] = (200, 100, 50)
    px[..., 3] = 255
    px[:14, :, 3] = 0  # transparent top half
    px[14:20, :, 3] = 128
    img, notes = read_image(_encode(Image.fromarray(px, "RGBA")), 3, (28, 28))
    out = _pixels(img)
    assert (out[:14] == 0).all()
    assert tuple(out[16, 5]) == (100, 50, 25)  # half-transparent: half the colour
    assert tuple(out[25, 5]) == (200, 100, 50)
    assert any("composited on black" in n for n in notes)


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (28, 28), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.paste(2, (0, 0, 10, 28))  # green stripe on the left
    pal.info["transparency"] = 2  # … which is transparent
    img, notes = read_image(_encode(pal, transparency=2), 3, (28, 28))
    out = _pixels(img)
    assert (out[:, :10] == 0).all() and tuple(out[5, 20]) == (255, 0, 0)
    assert any("Palette" in n for n in notes) and any("composited" in n for n in notes)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (28, 28), (0, 255, 255, 0))  # pure red
    img, notes = read_image(_encode(cmyk, "JPEG", quality=95), 3, (28, 28))
    r, g, b = (float(v) for v in img.mean(dim=(1, 2)))
    assert r > 0.9 and g < 0.1 and b < 0.1
    assert any("CMYK" in n for n in notes)


def test_sixteen_bit_grayscale_is_scaled_to_8_bits() -> None:
    values = np.array([[0, 257 * 100, 65535, 257 * 200]] * 4, dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    img, notes = read_image(_encode(im), 1, (4, 4))
    assert _pixels(img)[0, :, 0].tolist() == [0, 100, 255, 200]
    assert any("16-bit" in n for n in notes)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (28, 28), c) for c in ((255, 255, 255), (0, 0, 0), (90, 90, 90))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    img, notes = read_image(data, 1, (28, 28))
    assert float(img.min()) == 1.0  # white: the first frame, not the later ones
    assert any("first of its 3 frames" in n for n in notes)


def test_grey_image_is_replicated_for_an_rgb_model() -> None:
    px = _rgb()[:, :, 1]
    img, notes = read_image(_encode(Image.fromarray(px, "L")), 3, (28, 28))
    out = _pixels(img)
    assert all(np.array_equal(out[:, :, c], px) for c in range(3))
    assert any("replicated" in n for n in notes)


def test_rgb_image_becomes_luminance_for_a_grey_model() -> None:
    px = _rgb()
    img, notes = read_image(_encode(Image.fromarray(px)), 1, (28, 28))
    luma = px.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert img.shape == (1, 28, 28)
    assert np.abs(img[0].numpy() * 255 - luma).max() <= 1.0
    assert any("luminance" in n for n in notes)


def test_resizing_is_noted_with_the_aspect_ratio() -> None:
    img, notes = read_image(_encode(Image.fromarray(_rgb(56, 28))), 3, (28, 28))
    assert img.shape == (3, 28, 28)
    assert any("28×56 to 28×28 (aspect ratio not kept)" in n for n in notes)
    _, notes = read_image(_encode(Image.fromarray(_rgb(56, 56))), 3, (28, 28))
    assert any(n == "Resized from 56×56 to 28×28." for n in notes)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    data = _encode(Image.new("L", (20, 10), 128), "JPEG", exif=exif)
    img, notes = read_image(data, 1, (20, 10))  # (H, W) after rotation is 20×10
    assert any("EXIF" in n for n in notes)
    assert not any("Resized" in n for n in notes)
    assert img.shape == (1, 20, 10)


@pytest.mark.parametrize(
    "data",
    [
        b"this is not an image at all",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS would run Ghostscript
    ],
    ids=["text", "bad-png", "eps"],
)
def test_corrupt_or_unsupported_bytes_are_one_data_error(data: bytes) -> None:
    with pytest.raises(DataError) as exc:
        read_image(data, 1, (28, 28))
    assert "not a readable image" in _one_sentence(exc)


def test_truncated_image_is_one_data_error() -> None:
    data = _encode(Image.fromarray(_rgb(64, 64)))
    with pytest.raises(DataError) as exc:
        read_image(data[: len(data) // 2], 3, (28, 28))
    assert "upload" in _one_sentence(exc)


def test_empty_bytes() -> None:
    with pytest.raises(DataError) as exc:
        read_image(b"", 1, (28, 28))
    assert "empty" in _one_sentence(exc)


def test_image_over_max_pixels_is_refused_before_decoding() -> None:
    data = _encode(Image.new("L", (2000, 1000)))
    with pytest.raises(DataError) as exc:
        read_image(data, 1, (28, 28), max_pixels=1_000_000)
    assert "2,000,000 pixels" in _one_sentence(exc) and "1,000,000" in str(exc.value)


@pytest.mark.parametrize("side", [40, 50], ids=["pil-warning", "pil-error"])
def test_pil_decompression_bomb_becomes_data_error(
    side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warns above 1000, fails above 2000
    with pytest.raises(DataError) as exc:
        read_image(_encode(Image.new("L", (side, side))), 1, (28, 28), max_pixels=10**9)
    assert "too large" in _one_sentence(exc)


def test_bad_arguments() -> None:
    png = _encode(Image.new("L", (4, 4)))
    with pytest.raises(ConfigError):
        read_image(png, 0, (28, 28))
    with pytest.raises(ConfigError):
        read_image(png, 1, (28, 0))
    with pytest.raises(DataError):
        read_image("not bytes", 1, (28, 28))  # type: ignore[arg-type]


def test_to_display_shapes_and_values() -> None:
    grey = torch.tensor([[[0.0, 0.5], [1.0, 2.0]]])
    out = to_display(grey)
    assert out.dtype == np.uint8 and out.shape == (2, 2)
    assert out.tolist() == [[0, 128], [255, 255]]
    rgb = to_display(torch.rand(3, 5, 7))
    assert rgb.shape == (5, 7, 3) and rgb.flags["C_CONTIGUOUS"]
    assert to_display(torch.zeros(5, 7, dtype=torch.uint8)).shape == (5, 7)
    assert to_display(torch.rand(4, 5, 7)).shape == (5, 7, 3)
    with pytest.raises(DataError):
        to_display(torch.rand(1, 1, 5, 7))


# --------------------------------------------------------------------------- predictions


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> torch.nn.Module:
    return load_checkpoint(tiny_teacher)[0].eval()


def test_top_k_predictions_match_the_probabilities(small_test: ImageDataset) -> None:
    torch.manual_seed(0)
    model = create_model("small-cnn-student").eval()
    images = small_test.images[:6]
    top = top_k_predictions(model, images, small_test.mean, small_test.std, small_test.classes)
    probs = predict(model, images, small_test.mean, small_test.std, return_probs=True)
    assert len(top) == 6 and all(len(row) == 3 for row in top)
    for row, p in zip(top, probs, strict=True):
        assert row[0][0] == small_test.classes[int(p.argmax())]
        assert row[0][1] == pytest.approx(float(p.max()), abs=1e-6)
        assert [v for _, v in row] == sorted((v for _, v in row), reverse=True)
    single = top_k_predictions(
        model, images[0], small_test.mean, small_test.std, small_test.classes, k=20
    )
    assert len(single) == 1 and len(single[0]) == 10  # k capped at the class count
    assert sum(v for _, v in single[0]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError):
        top_k_predictions(model, images, small_test.mean, small_test.std, ["a", "b"])
    with pytest.raises(ConfigError):
        top_k_predictions(model, images, small_test.mean, small_test.std, small_test.classes, 0)


def test_flip_grid_counts_flips_like_asr(teacher: torch.nn.Module, small_test) -> None:
    trigger = create_trigger("badnets", size=3)
    grid = flip_grid(teacher, small_test, trigger, 0, 12, seed=3)
    assert grid.n == 12 and (grid.labels != 0).all()
    assert torch.equal(grid.labels, small_test.labels[grid.indices])
    assert torch.equal(grid.triggered, trigger.apply(grid.clean))
    assert grid.n_flipped == int((grid.triggered_preds == 0).sum())
    again = flip_grid(teacher, small_test, trigger, 0, 12, seed=3)
    assert torch.equal(again.indices, grid.indices)
    assert not torch.equal(flip_grid(teacher, small_test, trigger, 0, 12, 4).indices, grid.indices)
    d = grid.to_dict()
    assert d["n"] == 12 and d["n_flipped"] == grid.n_flipped and len(d["flipped"]) == 12
    # over every eligible image, the flip rate is the ASR
    eligible = int((small_test.labels != 0).sum())
    full = flip_grid(teacher, small_test, trigger, 0, eligible)
    assert full.n_flipped / full.n == pytest.approx(evaluate(teacher, small_test, trigger, 0).asr)
    with pytest.raises(ConfigError):
        flip_grid(teacher, small_test, trigger, 0, eligible + 1)
    with pytest.raises(ConfigError):
        flip_grid(teacher, small_test, trigger, 10, 4)


# --------------------------------------------------------------------------- figures


def _stats(var_scale: torch.Tensor, layer: str = "block2") -> LayerStats:
    unit_var = torch.ones(4, 5, 6) * var_scale.view(-1, 1, 1)
    return LayerStats(
        layer=layer,
        n=50,
        channel_mean=torch.zeros(4),
        channel_var=var_scale.clone(),
        unit_mean=torch.zeros(4, 5, 6),
        unit_var=unit_var,
    )


@pytest.fixture()
def comparison():
    clean = _stats(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    trig_var = torch.tensor([1.0, 4.0, 0.5, 2.0])
    trig = _stats(trig_var)
    trig.unit_var[1, 4, 5] = 40.0  # a localised hot spot, bottom-right
    return compare_layer(clean, trig)


def test_compare_layer_ratios(comparison) -> None:
    assert comparison.channel_ratio.argmax() == 1
    assert comparison.top_channels(2) == ([1, 3], pytest.approx([4 / 1.1, 2 / 1.1]))
    assert comparison.spatial_ratio.shape == (5, 6)
    assert tuple(int(v) for v in divmod(int(comparison.spatial_ratio.argmax()), 6)) == (4, 5)
    with pytest.raises(ConfigError):
        compare_layer(_stats(torch.ones(4)), _stats(torch.ones(4), layer="block3"))


def test_variance_figures(comparison) -> None:
    fig = channel_variance_figure(comparison)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert np.asarray(fig.data[0].z).shape == (2, 4) and np.asarray(fig.data[1].z).shape == (1, 4)
    assert np.asarray(fig.data[1].z)[0, 1] == pytest.approx(4 / 1.1)

    fig = spatial_variance_figure(comparison)
    assert len(fig.data) == 3 and np.asarray(fig.data[2].z).shape == (5, 6)
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 on top, as in an image

    fig = ranked_channels_figure(comparison, k=3)
    assert list(fig.data[0].x) == ["ch 1", "ch 3", "ch 0"]
    assert list(fig.data[0].y) == sorted(fig.data[0].y, reverse=True)

    acts = torch.rand(4, 5, 6)
    acts[3, 2, 4] = 9.0
    fig = activation_maps_figure(acts, acts * 2, [1, 3], "block2")
    assert len(fig.data) == 1 and "block2" in fig.layout.title.text
    assert list(fig.layout.xaxis.ticktext) == ["ch 1", "ch 3"]
    shade, raw = np.asarray(fig.data[0].z, float), np.asarray(fig.data[0].customdata, float)
    gap = 1  # between tiles: blank in both rows and columns
    assert shade.shape == (2 * 5 + gap, 2 * 6 + gap) and np.isnan(shade[5]).all()
    assert np.isnan(shade[:, 6]).all()
    # each channel's clean and triggered maps share its range: its peak (triggered) is 1
    assert shade[5 + gap + 2, 6 + gap + 4] == pytest.approx(1.0)
    assert raw[5 + gap + 2, 6 + gap + 4] == pytest.approx(18.0)
    assert np.nanmax(shade[:5, :6]) <= 0.5 + 1e-6  # channel 1 clean: half its triggered peak
    assert fig.data[0].text[2][6 + gap + 4] == "ch 3 clean, row 2, col 4"
    with pytest.raises(ConfigError):
        activation_maps_figure(acts, acts, [7])


@pytest.mark.parametrize("granularity", ["unit", "channel"])
def test_flagged_units_figure(granularity: str) -> None:
    scores = torch.ones(4, 5, 6)
    scores[2, 1, 1] = 9.0
    scores[3, 1, 1] = 3.0
    if granularity == "channel":
        scores = scores.amax(dim=(1, 2))
    clean = _stats(torch.ones(4))
    fit = LayerFit("block2", granularity, scores, scores, 2.0, clean, torch.zeros(4, 5, 6))
    fig = flagged_units_figure(fit, 2.5)
    flagged = np.asarray(fig.data[1].z)
    assert int(flagged.sum()) == int(fit.mask(2.5).sum())
    assert f"{int(fit.mask(2.5).sum())} of 120 units flagged" in fig.layout.title.text
    assert int(np.asarray(flagged_units_figure(fit, 5.0).data[1].z).sum()) < flagged.sum()
    with pytest.raises(ConfigError):
        flagged_units_figure(fit, -1.0)


# --------------------------------------------------------------------------- pages


def open_page(page: str) -> AppTest:
    """The page through the app's own navigation when app/main.py registers it; until it
    does, the page file run on its own (the same script, without the sidebar)."""
    at = AppTest.from_file(str(MAIN), default_timeout=120)
    at.run()
    assert not at.exception
    try:
        at.switch_page(f"../pages/{page}")
    except ValueError:  # not registered in st.navigation (yet)
        at = AppTest.from_file(str(ROOT / "pages" / page), default_timeout=120)
    return at.run()


@pytest.fixture()
def app_env(tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))


def _top3(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("1. **")]


def _flips(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "flipped to class" in m.value)


@pytest.mark.usefixtures("app_env")
def test_triggers_page_shows_trigger_and_flips() -> None:
    at = open_page("triggers.py")
    assert not at.exception and not at.error
    assert at.title[0].value == "Triggers"
    assert list(at.selectbox(key="trig_name").options) == trigger_names()
    assert at.selectbox(key="trig_name").value == "badnets"  # the teacher's stored trigger
    assert at.slider(key="trig_size").value == 3
    tops = _top3(at)
    assert len(tops) == 2 and all(t.count("%") == 3 for t in tops)
    assert " of 8 flipped to class 0 (T-shirt/top)" in _flips(at)

    at.slider(key="trig_size").set_value(12).run()
    assert not at.exception
    assert _top3(at)[0] == tops[0] and _top3(at)[1] != tops[1]  # only the triggered side moves
    assert "size=12" in next(c.value for c in at.caption if "BadNetsTrigger" in c.value)

    at.slider(key="trig_grid_n").set_value(16).run()
    assert " of 16 flipped" in _flips(at)

    at.selectbox(key="trig_name").set_value("blend").run()
    blend = _top3(at)[1]
    at.slider(key="trig_alpha").set_value(0.6).run()
    assert not at.exception and _top3(at)[1] != blend
    assert at.session_state["current_trigger"]["alpha"] == pytest.approx(0.6)


@pytest.mark.usefixtures("app_env")
def test_triggers_page_uploads() -> None:
    at = open_page("triggers.py")
    at.radio(key="trig_src").set_value("Upload an image").run()
    assert not at.exception and any("Upload an image" in i.value for i in at.info)

    at.file_uploader(key="trig_upload").upload("bad.png", b"not an image", "image/png").run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "The file bad.png is not a readable image; upload a PNG, JPEG, GIF, BMP, TIFF, WebP "
        "or PPM file."
    ]
    assert at.radio(key="trig_src").value == "Upload an image"  # nothing lost
    assert "flipped to class" in _flips(at)  # the rest of the page still works

    png = _encode(Image.fromarray(_rgb(56, 56)))
    at.file_uploader(key="trig_upload").clear().upload("photo.png", png, "image/png").run()
    assert not at.exception and not at.error
    assert any("luminance" in i.value for i in at.info)
    assert len(_top3(at)) == 2

    # a custom trigger from an uploaded pattern
    at.selectbox(key="trig_name").set_value("custom").run()
    assert any("Upload a pattern" in i.value for i in at.info)
    pattern = np.zeros((8, 8), np.uint8)
    pattern[5:, 5:] = 255
    at.file_uploader(key="trig_pattern_file").upload(
        "pattern.png", _encode(Image.fromarray(pattern, "L")), "image/png"
    ).run()
    assert not at.exception and not at.error
    assert at.session_state["current_trigger"]["name"] == "custom"
    assert "flipped to class" in _flips(at)
    at.file_uploader(key="trig_mask_file").upload("mask.png", b"\x89PNG broken", "image/png")
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "The mask mask.png is not a readable image; upload a PNG, JPEG, GIF, BMP, TIFF, WebP "
        "or PPM file."
    ]
    assert at.selectbox(key="trig_name").value == "custom"


def open_tab(at: AppTest, label: str) -> AppTest:
    """Open one of the Feature variance page's tabs (only the open one runs): the tab is
    bound to the address, as a click in the browser sets both."""
    at.session_state["var_tab"] = label
    at.query_params["var_tab"] = label
    return at.run()


def _caption(at: AppTest, start: str) -> str:
    return next(c.value for c in at.caption if c.value.startswith(start))


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


@pytest.mark.usefixtures("app_env")
def test_variance_page_first_answer_then_all_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no time for the whole preview, the page first answers from part of the images,
    then shows the answer on all of them."""
    import streamlit as st

    st.cache_resource.clear()  # a fresh preview: nothing remembered from other tests
    monkeypatch.setattr(detox, "INTERACTIVE_MS", 0.0)
    answers: list[tuple[float | None, Preview]] = []
    call = DetoxPreview.__call__

    def spy(self: DetoxPreview, *args: object, budget_ms: float | None = None) -> Preview:
        result = call(self, *args, budget_ms=budget_ms)  # type: ignore[arg-type]
        answers.append((budget_ms, result))
        return result

    monkeypatch.setattr(DetoxPreview, "__call__", spy)
    at = open_tab(open_page("variance.py"), "Threshold")
    at.select_slider(key="var_n").set_value(100)
    at.number_input(key="var_trusted").set_value(100)
    at.run()
    assert not at.exception and not at.error
    (budget, first), (again, full) = answers[-2:]
    assert budget == 0.0 and not first.complete and first.n_clean < 100
    assert again is None and full.complete and full.n_clean == 100
    help_acc = next(m.help for m in at.metric if m.label == "Detoxified ACC")
    assert help_acc.startswith("100 test images;")
    assert f"{100 * full.acc:.2f} %" == _metric(at, "Detoxified ACC")
    assert not any("First answer on" in c.value for c in at.caption)  # replaced by all


@pytest.mark.usefixtures("app_env")
def test_variance_page_forgets_kept_choices_that_no_longer_fit() -> None:
    """Choices kept across pages that the current teacher or data cannot take (a layer it
    does not have, more images than the set holds) start from the defaults, not an error."""
    at = open_tab(open_page("variance.py"), "Top channels")
    at.switch_page(str(ROOT / "pages" / "teacher.py")).run()  # the page's widgets forgotten
    for key, value in (("var_layer", "layer9"), ("var_n", 777), ("var_image", 5000)):
        at.session_state[f"_{key}"] = value  # as kept from another teacher or data set
    at.switch_page(str(ROOT / "pages" / "variance.py")).run()
    assert not at.exception and not at.error
    assert at.selectbox(key="var_layer").value == "block2"
    assert at.select_slider(key="var_n").value == 500
    assert at.number_input(key="var_image").value == 0
    at.number_input(key="var_image").set_value(7).run()
    at.select_slider(key="var_n").set_value(100).run()
    assert at.number_input(key="var_image").value == 7  # still inside the 100 images
    open_tab(at, "Threshold")
    at.switch_page(str(ROOT / "pages" / "teacher.py")).run()
    at.session_state["_var_trusted"] = 10**6
    at.switch_page(str(ROOT / "pages" / "variance.py")).run()
    open_tab(at, "Threshold")
    assert not at.exception and at.number_input(key="var_trusted").value == 500
    assert at.select_slider(key="var_n").value == 100  # what fits is still kept


@pytest.mark.usefixtures("app_env")
def test_variance_page_threshold_and_auto() -> None:
    at = open_page("variance.py")
    assert not at.exception and not at.error
    assert at.selectbox(key="var_layer").options == ["block1", "block2", "block3"]
    at.select_slider(key="var_n").set_value(100).run()
    # only the open tab runs: the variance maps first, without the threshold's work
    assert at.session_state["var_tab"] == "Variance maps" and not at.metric
    assert len(at.get("plotly_chart")) == 2  # channel, spatial
    open_tab(at, "Top channels")
    assert len(at.get("plotly_chart")) == 2 and not at.exception  # ranked, activations
    assert _caption(at, "Largest ratios: channel ")
    open_tab(at, "Threshold")
    at.number_input(key="var_trusted").set_value(100)
    at.run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 1  # flagged units
    assert "from the teacher's stored trigger" in _caption(at, "Trigger `BadNetsTrigger")

    slider = at.select_slider(key="var_threshold")
    options = [float(v) for v in slider.options]
    assert options[0] <= 1.0 and options[-1] >= 50.0
    before = (_caption(at, "Flagged at threshold"), _metric(at, "Flagged units"))
    slider.set_value(options[0]).run()  # the lowest threshold flags the most units
    after = (_caption(at, "Flagged at threshold"), _metric(at, "Flagged units"))
    assert not at.exception and after != before
    assert int(after[1].replace(",", "")) > int(before[1].replace(",", ""))
    assert _metric(at, "Detoxified ACC").endswith("%")

    at.select_slider(key="var_threshold").set_value(options[-1]).run()
    high = _metric(at, "Flagged units")
    at.button(key="var_auto_btn").click().run()
    assert not at.exception and not at.error
    auto = at.session_state["var_auto"]
    assert auto > 0 and at.select_slider(key="var_threshold").value == auto
    assert _caption(at, "Auto:").startswith(f"Auto: {auto:g}")
    assert f"Flagged at threshold {auto:g}" in _caption(at, "Flagged at threshold")
    assert _metric(at, "Flagged units") != high or auto >= 50

    at.selectbox(key="var_layer").set_value("block1").run()
    assert not at.exception and "block1" in _caption(at, "Flagged at threshold")

    # another tab, and back: the threshold and the trusted-set size are where they were
    chosen = at.select_slider(key="var_threshold").value
    open_tab(at, "Variance maps")
    assert not at.exception and not at.metric
    open_tab(at, "Threshold")
    assert at.select_slider(key="var_threshold").value == chosen
    assert at.number_input(key="var_trusted").value == 100
    assert at.select_slider(key="var_n").value == 100

    # the trigger built on the Triggers page is the one analysed, until reset
    at.session_state["current_trigger"] = create_trigger("badnets", size=5).to_dict()
    at.session_state["current_target"] = 0
    at.run()
    assert not at.exception and not at.error
    assert "size=5" in _caption(at, "Trigger `") and "Triggers page" in _caption(at, "Trigger `")
    at.button(key="var_stored_trigger").click().run()
    assert not at.exception and "size=3" in _caption(at, "Trigger `")
    assert "stored trigger" in _caption(at, "Trigger `")
