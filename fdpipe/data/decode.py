"""Image decoding to RGB uint8, the ADM centre crop, and bad-file bookkeeping.

Every decodable format is converted to RGB. Each kind of conversion
(palette, grayscale, alpha, CMYK, 16-bit) is logged once per
``ConversionNotes`` object with the first file, and counted. Files that do not
decode (not an image, empty, truncated) raise ``BadImageError`` naming the
file, unless the caller collects them in ``BadImages`` with skipping enabled.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from fdpipe.store import atomic_path

log = logging.getLogger(__name__)

# Truncated files must fail, never be padded with gray silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SKIP_HINT = ("fix or remove it, or pass --skip-bad-images (config key data.skip_bad_images) "
             "to skip such files and list them")


class BadImageError(ValueError):
    """A file that is not a decodable image; the message names it."""


class ConversionNotes:
    """Log each kind of RGB conversion once and count how often it happened."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def note(self, kind: str, path: str | Path, detail: str) -> None:
        with self._lock:
            first = kind not in self.counts
            self.counts[kind] += 1
        if first:
            log.info("converting %s images to RGB (%s; first file: %s); later ones are "
                     "converted the same way and counted", kind, detail, path)

    def summary(self) -> None:
        for kind, count in sorted(self.counts.items()):
            log.info("converted %d %s image(s) to RGB", count, kind)


class BadImages:
    """Files that failed to decode: raise at once, or collect them when skipping."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.files: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def handle(self, path: str | Path, reason: str) -> None:
        if not self.skip:
            raise BadImageError(f"{path}: {reason}; {SKIP_HINT}")
        with self._lock:
            self.files.append({"file": str(path), "reason": reason})
        log.warning("skipping bad image %s: %s", path, reason)

    def write_report(self, output: str | Path) -> Path | None:
        """Write ``<output>.bad_images.json`` when files were skipped; return its path."""
        if not self.files:
            return None
        report = Path(f"{output}.bad_images.json")
        with atomic_path(report) as tmp:
            tmp.write_text(json.dumps({"count": len(self.files), "files": self.files},
                                      indent=2) + "\n")
        log.warning("skipped %d bad image(s); list written to %s", len(self.files), report)
        return report


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Modes I;16* contain 0..65535, and so does mode I from a 16-bit PNG.
    array = np.asarray(image, dtype=np.float64)
    gray = np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _has_16_bit_samples(image: Image.Image) -> bool:
    # Pillow decodes 48-bit RGB PNGs to 8-bit RGB; only the tile's raw mode shows the depth.
    return any(len(tile) > 3 and ";16" in str(tile[3]) for tile in (image.tile or []))


def to_rgb(image: Image.Image, path: str | Path, notes: ConversionNotes) -> Image.Image:
    """Convert any decoded mode to RGB, noting the kind of conversion."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        notes.note("palette", path, "colour table expanded; transparency dropped")
        return image.convert("RGBA").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.note("alpha", path, "alpha channel dropped, colour kept as stored")
        return image.convert("RGB")
    if mode == "CMYK":
        notes.note("CMYK", path, "Pillow's CMYK to RGB conversion")
        return image.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        notes.note("16-bit", path, "values divided by 257 and rounded to 8 bits")
        return _sixteen_bit_to_rgb(image)
    if mode in ("L", "1"):
        notes.note("grayscale", path, "gray value copied to R, G and B")
        return image.convert("RGB")
    notes.note(f"mode {mode}", path, "Pillow's conversion")
    return image.convert("RGB")


def open_rgb(path: str | Path, notes: ConversionNotes) -> Image.Image:
    """Decode one file fully and return it as an RGB image; raise BadImageError if it fails."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImageError(f"{path}: empty file")
    try:
        with Image.open(path) as image:
            wide = _has_16_bit_samples(image)
            image.load()
            if wide and image.mode == "RGB":
                notes.note("16-bit", path, "Pillow keeps the high byte of each sample")
            return to_rgb(image, path, notes)
    except UnidentifiedImageError as err:
        raise BadImageError(f"{path}: not an image file Pillow can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow raises OSError for truncated data and SyntaxError for broken headers.
        raise BadImageError(f"{path}: cannot decode ({err})") from err


def check_header(path: str | Path) -> tuple[int, int]:
    """Read only the header; return (width, height) or raise BadImageError."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImageError(f"{path}: empty file")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except UnidentifiedImageError as err:
        raise BadImageError(f"{path}: not an image file Pillow can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"{path}: cannot read the header ({err})") from err
    if width < 1 or height < 1:
        raise BadImageError(f"{path}: image has size {width}x{height}")
    return width, height


def adm_centre_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM-style centre crop of an RGB image to uint8 (resolution, resolution, 3).

    While the short side is at least twice the target, halve the image with a
    BOX filter; then resize with BICUBIC so the short side equals the target;
    then cut the centred square.
    """
    while min(image.size) >= 2 * resolution:
        half = (image.size[0] // 2, image.size[1] // 2)
        image = image.resize(half, resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.size[0] * scale)),
            max(resolution, round(image.size[1] * scale)))
    image = image.resize(size, resample=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]
