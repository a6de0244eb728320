"""Reading user-uploaded images safely, and turning image tensors into displayable pixels.

``read_image`` accepts the bytes of an uploaded file and returns the float ``(C, H, W)`` image
a model takes, plus one note per conversion it made (mode, transparency, bit depth, frames,
channels, size), so the app can say what happened to the upload. Anything unreadable, empty
or too large raises ``DataError`` with one sentence; nothing a decoder says leaks out.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from robustkd.errors import ConfigError, DataError

# Decoders with no external programs (PIL's EPS plugin, for one, runs Ghostscript).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
FORMAT_NAMES = "PNG, JPEG, GIF, BMP, TIFF, WebP or PPM"
MAX_PIXELS = 40_000_000

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _check_args(channels: int, size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ConfigError(f"An image needs at least one channel; got {channels!r}.")
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    if not ok:
        raise ConfigError(f"The image size must be two positive integers (H, W); got {size!r}.")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer; got {max_pixels!r}.")
    return int(size[0]), int(size[1])


def _open(
    source: bytes | Path, what: str, max_pixels: int, remedy: str = "upload"
) -> Image.Image:
    """Open (header only) and check the pixel count before any pixel is decoded.

    ``source`` is the bytes of an upload or the path of a user's file; ``remedy`` words the
    advice: "upload" (a new file) or "replace" (a file in the user's folder).
    """
    again = (
        f"upload a {FORMAT_NAMES} file"
        if remedy == "upload"
        else f"replace it with a {FORMAT_NAMES} file or remove it"
    )
    smaller = "upload a smaller image" if remedy == "upload" else "shrink it or remove it"
    try:
        with warnings.catch_warnings():
            # PIL only warns below twice its own limit; an upload that size is refused outright
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(
                io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS
            )
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(
            f"The {what} is too large for this image reader (more than {max_pixels:,} pixels); "
            f"{smaller}."
        ) from exc
    except Exception as exc:  # any decoder failure on user bytes means "not an image we read"
        if remedy == "upload":
            raise DataError(f"The {what} is not a readable image; {again}.") from exc
        raise DataError(f"The {what} cannot be read (damaged, or not an image); {again}.") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DataError(
            f"The {what} has {width}×{height} = {width * height:,} pixels, more than the limit "
            f"of {max_pixels:,}; {smaller}."
        )
    return image


def read_pixels(path: Path, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A user's image file as uint8 ``(H, W)`` (grey) or ``(H, W, 3)`` pixels, unresized.

    The same safeguards as ``read_image``; the first frame of an animation, EXIF rotation
    applied, any mode converted to 8-bit grey or RGB. ``what`` names the file in errors.
    """
    image = _open(path, what, max_pixels, remedy="replace")
    try:
        with image:
            if int(getattr(image, "n_frames", 1) or 1) > 1:
                image.seek(0)
            image.load()
            upright: Image.Image = image
            if image.getexif().get(0x0112, 1) in range(2, 9):  # EXIF says "rotate me"
                upright = ImageOps.exif_transpose(image)
            return np.array(to_rgb_or_l(upright, []), dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # truncated or corrupt pixel data
        raise DataError(
            f"The {what} cannot be read (damaged, or not an image); replace it with a "
            f"{FORMAT_NAMES} file or remove it."
        ) from exc


def to_rgb_or_l(image: Image.Image, notes: list[str]) -> Image.Image:
    """Convert any PIL mode to 8-bit "L" or "RGB", noting what was done."""
    mode = image.mode
    has_alpha = mode in _WITH_ALPHA or "transparency" in image.info
    # integer and PIL operations throughout: a 40-megapixel upload must not become gigabytes
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        if mode in _SIXTEEN_BIT or a.max(initial=0) > 255:
            a = (a + 128) // 257  # 65535 → 255, rounded
            notes.append("16-bit image scaled to 8 bits.")
        return Image.fromarray(a.astype(np.uint8), "L")
    if mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float32))
        if a.max(initial=0) <= 1.0:
            a = a * 255.0
        notes.append("Floating-point image converted to 8 bits.")
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if has_alpha:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:
            notes.append("Transparent pixels composited on black.")
        if mode in ("P", "PA"):
            notes.append("Palette image converted to RGB.")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba.convert("RGB"), mask=alpha)  # colour × alpha over black
        return out.convert("L") if mode in ("L", "LA", "La") else out
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        notes.append("Black-and-white image converted to grayscale.")
        return image.convert("L")
    if mode == "P":
        notes.append("Palette image converted to RGB.")
        return image.convert("RGB")
    notes.append(f"{mode} image converted to RGB.")
    return image.convert("RGB")


def read_image(
    data: bytes,
    channels: int,
    size: tuple[int, int],
    max_pixels: int = MAX_PIXELS,
    *,
    what: str = "uploaded file",
) -> tuple[torch.Tensor, list[str]]:
    """An uploaded image as a float ``(channels, H, W)`` tensor in [0, 1], and notes.

    ``size`` is ``(H, W)``; the image is resized to it (aspect ratio not kept). Colour images
    become grey by luminance (ITU-R 601) for one channel; grey images are replicated for
    three (and for any other channel count, grey is repeated). ``what`` names the file in
    error messages.
    """
    height, width = _check_args(channels, size, max_pixels)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"The {what} must be given as bytes; got {type(data).__name__}.")
    data = bytes(data)
    if not data:
        raise DataError(f"The {what} is empty; upload a {FORMAT_NAMES} image.")
    notes: list[str] = []
    image = _open(data, what, max_pixels)
    try:
        frames = int(getattr(image, "n_frames", 1) or 1)
        if frames > 1:
            image.seek(0)
            notes.append(f"Animated image: used the first of its {frames} frames.")
        size0 = image.size
        if image.format == "JPEG":  # decode big photos at 1/2, 1/4 or 1/8 scale, still ≥ size
            side = max(height, width)
            image.draft(None, (side, side))
        image.load()
        orientation = image.getexif().get(0x0112, 1)  # EXIF orientation, 1 = upright
        if orientation in range(2, 9):
            image = ImageOps.exif_transpose(image)
            notes.append("Rotated as its EXIF orientation says.")
            if orientation >= 5:  # a quarter turn swaps width and height
                size0 = size0[::-1]
        image = to_rgb_or_l(image, notes)
    except DataError:
        raise
    except Exception as exc:  # truncated or corrupt pixel data
        raise DataError(
            f"The {what} is damaged and cannot be decoded; upload a complete {FORMAT_NAMES} file."
        ) from exc

    if channels == 1 and image.mode == "RGB":
        image = image.convert("L")  # ITU-R 601 luma
        notes.append("Colour image converted to grayscale (luminance) for a 1-channel model.")
    elif channels == 3 and image.mode == "L":
        image = image.convert("RGB")
        notes.append("Grayscale image replicated to 3 channels for an RGB model.")
    elif channels not in (1, 3):
        if image.mode == "RGB":
            image = image.convert("L")
        notes.append(f"Image converted to grayscale and repeated over {channels} channels.")

    if image.size != (width, height):
        w0, h0 = size0  # as uploaded (a JPEG may have been decoded smaller already)
        kept = abs(w0 * height - h0 * width) <= max(w0, h0)
        image = image.resize((width, height), Image.Resampling.BILINEAR)  # antialiased by PIL
        notes.append(
            f"Resized from {w0}×{h0} to {width}×{height}"
            + ("." if kept else " (aspect ratio not kept).")
        )
    pixels = np.array(image, dtype=np.uint8)  # a writable copy for torch
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] != channels:
        pixels = np.repeat(pixels[:, :, :1], channels, axis=2)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0
    return tensor.contiguous(), notes


def read_rgba(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, bool]:
    """Image bytes as uint8 RGBA ``(H, W, 4)`` pixels, and whether the image has transparency.

    The same checks as ``read_image`` (formats, pixel cap before decoding, bombs); the pixels
    keep their size. ``what`` names the image in error messages.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer; got {max_pixels!r}.")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"The {what} must be given as bytes; got {type(data).__name__}.")
    data = bytes(data)
    if not data:
        raise DataError(f"The {what} is empty; give a {FORMAT_NAMES} image.")
    image = _open(data, what, max_pixels)
    try:
        with image:
            if int(getattr(image, "n_frames", 1) or 1) > 1:
                image.seek(0)
            image.load()
            has_alpha = image.mode in _WITH_ALPHA or "transparency" in image.info
            if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
                converted = to_rgb_or_l(image, [])  # PIL's own convert clips these to 255
            else:
                converted = image
            rgba = np.array(converted.convert("RGBA"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # truncated or corrupt pixel data
        raise DataError(
            f"The {what} is damaged and cannot be decoded; give a complete {FORMAT_NAMES} file."
        ) from exc
    return rgba, has_alpha


def to_display(image: torch.Tensor) -> np.ndarray:
    """A float [0, 1] (or uint8) ``(C, H, W)`` / ``(H, W)`` image as uint8 pixels for ``st.image``.

    One or two channels give ``(H, W)`` (the first channel); three or more give ``(H, W, 3)``
    (the first three, e.g. RGB of RGBA).
    """
    if not isinstance(image, torch.Tensor):
        raise DataError(f"to_display takes an image tensor; got {type(image).__name__}.")
    t = image.detach().cpu()
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise DataError(f"to_display takes a (C, H, W) or (H, W) image; got {tuple(t.shape)}.")
    if t.dtype == torch.uint8:
        pixels = t
    else:
        pixels = t.float().nan_to_num(0.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    if pixels.shape[0] >= 3:
        return np.ascontiguousarray(pixels[:3].permute(1, 2, 0).numpy())
    return np.ascontiguousarray(pixels[0].numpy())
