"""Preparing a user's folder of images: listing, checking every file and indexing, at the scale of a
large catalogue (100,000 small images in 10,000 classes by default).

    python -m benchmarks.prepare_folder [--images 100000] [--classes 10000] [--size 64] [--folder F]

Writes the folder once (JPEGs of ``--size`` px, natural-looking noise, class folders of 10 images; kept in
``--folder`` for the next run), then times, in a fresh datamodule each: the first preparation (the walk,
every file read, decoded and hashed, the index written), the second (the walk and the stamp only: the
index is reused), and the class split with the datamodule's setup. Prints a table and the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dml.data import FolderDataModule


def write_folder(folder: Path, images: int, classes: int, size: int) -> None:
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == f"{images} {classes} {size}":
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (classes, 3), dtype=np.uint8)
    for i in range(images):
        c = i % classes
        pixels = (rng.integers(0, 48, (size, size, 3)) + base[c] // 2).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        path = folder / f"class {c:05d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    marker.write_text(f"{images} {classes} {size}")


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--folder", type=Path, default=Path("benchmarks/.prepare_folder"))
    args = parser.parse_args()
    written = timed(lambda: write_folder(args.folder, args.images, args.classes, args.size))
    (args.folder / "dml_index.json").unlink(missing_ok=True)

    def module() -> FolderDataModule:
        return FolderDataModule(
            str(args.folder), batch_size=120, samples_per_class=4, image_size=32, resize_size=36
        )

    first = timed(lambda: module().prepare_data())
    again = timed(lambda: module().prepare_data())
    dm = module()
    split = timed(lambda: dm.setup("fit"))
    rows = [
        ("write the folder (once; not preparation)", written),
        ("first preparation: walk, read, decode and hash every file, write the index", first),
        ("later preparation: walk and stamp, index reused", again),
        ("class split and splits built (datamodule setup)", split),
    ]
    print(f"{args.images} images of {args.size} px in {args.classes} classes, {args.folder}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| step | seconds |\n| --- | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"first preparation: {args.images / first:.0f} images/s")


if __name__ == "__main__":
    main()
