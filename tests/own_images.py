"""Folders and tables of a user's own images, generated for the tests: several formats and pixel modes,
class names with spaces and non-ASCII letters, images nested inside their class's folder."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

# (format, mode, suffix): what a user's folder holds
FORMATS = [
    ("JPEG", "RGB", ".jpg"),
    ("PNG", "RGBA", ".png"),
    ("PNG", "L", ".PNG"),
    ("WEBP", "RGB", ".webp"),
    ("BMP", "RGB", ".bmp"),
    ("TIFF", "RGB", ".tiff"),
    ("PNG", "P", ".png"),
    ("PNG", "I;16", ".png"),
    ("JPEG", "CMYK", ".jpeg"),
]
CLASSES = ["Blue Jay", "Ñandú común", "cat", "dog", "eagle", "fox", "gull", "hare"]


def image_file(seed: int, fmt: str, mode: str, shade: int) -> bytes:
    """A 20-30 px image of class-dependent colour (``shade``) plus noise, in ``fmt`` and ``mode``."""
    rng = np.random.default_rng(seed)
    height, width = 20 + seed % 7, 24 + seed % 5
    pixels = (rng.integers(0, 64, (height, width, 3)) + shade).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def make_folder(
    root: Path, classes: list[str] = CLASSES, per_class: int = 6, start: int = 0
) -> dict[str, list[str]]:
    """``root/<class>/[nested/]<image>``: every other image one folder down. Returns each class's files."""
    files: dict[str, list[str]] = {}
    for c, name in enumerate(classes):
        for j in range(per_class):
            seed = start + c * 100 + j
            fmt, mode, suffix = FORMATS[seed % len(FORMATS)]
            rel = Path(name) / ("nested" if j % 2 else "") / f"image {j}{suffix}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(image_file(seed, fmt, mode, shade=(c * 37) % 192))
            files.setdefault(name, []).append(rel.as_posix())
    return files


def make_table(path: Path, rows: list[dict[str, object]], columns: list[str] | None = None) -> Path:
    """A CSV table of ``rows`` (open-metric-learning's column names)."""
    columns = columns or list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def oml_rows(files: dict[str, list[str]], test: list[str]) -> list[dict[str, object]]:
    """open-metric-learning's format: train rows, and validation rows whose first two images per class
    are queries and the rest gallery items."""
    rows: list[dict[str, object]] = []
    for label, (name, paths) in enumerate(files.items()):
        for j, path in enumerate(paths):
            evaluated = name in test
            rows.append(
                {
                    "label": label,
                    "path": path,
                    "split": "validation" if evaluated else "train",
                    "is_query": (j < 2) if evaluated else "",
                    "is_gallery": (j >= 2) if evaluated else "",
                }
            )
    return rows


TINY = [
    "backbone=timm_test",
    "dataset.image_size=32",
    "dataset.resize_size=36",
    "dataset.batch_size=4",
    "dataset.samples_per_class=2",
    "dataset.num_workers=0",
]
