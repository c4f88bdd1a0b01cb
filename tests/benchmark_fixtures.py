"""Small copies of the official benchmark distributions, in their exact layouts, for reader tests.

Each builder writes the official archive(s) into ``root`` (packed, as downloaded) and returns what a
reader should find: {split: (number of images, number of classes)} and extras.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def image_bytes(seed: int, fmt: str = "JPEG", mode: str = "RGB", size: int | tuple[int, int] = 12) -> bytes:
    """An image of random pixels; ``size``: its side, or (height, width)."""
    rng = np.random.default_rng(seed)
    height, width = (size, size) if isinstance(size, int) else size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, fmt)
    return buf.getvalue()


def write_tgz(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_zip(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def make_cub(
    root: Path,
    per_class: int = 4,
    size: Callable[[int], int | tuple[int, int]] | None = None,
    train_classes: int = 3,
) -> dict:
    """CUB_200_2011.tgz with classes 1-``train_classes`` (train side) and 101-103 (test side); ``size``:
    each image's size (see :func:`image_bytes`) from its number, 12 x 12 by default."""
    classes = [*range(1, train_classes + 1), 101, 102, 103]
    files, images, labels, seed = {}, [], [], 0
    for c in classes:
        folder = f"{c:03d}.Bird_{c}"
        for j in range(per_class):
            seed += 1
            rel = f"{folder}/Bird_{c}_{j:04d}_{seed}.jpg"
            files[f"CUB_200_2011/images/{rel}"] = image_bytes(seed, size=size(seed) if size else 12)
            images.append(f"{seed} {rel}")
            labels.append(f"{seed} {c}")
    files["CUB_200_2011/images.txt"] = ("\n".join(images) + "\n").encode()
    files["CUB_200_2011/image_class_labels.txt"] = ("\n".join(labels) + "\n").encode()
    files["CUB_200_2011/classes.txt"] = "".join(f"{c} {c:03d}.Bird_{c}\n" for c in classes).encode()
    write_tgz(root / "CUB_200_2011.tgz", files)
    return {
        "train": (train_classes * per_class, train_classes),
        "test": (3 * per_class, 3),
        "num_train_classes": train_classes,
    }


def make_cars(root: Path, per_class: int = 3) -> dict:
    """car_ims.tgz + cars_annos.mat (a 1 x N struct array, as published) with classes 1-3 and 99-101."""
    classes = [1, 2, 3, 99, 100, 101]
    files, records = {}, []
    n = 0
    for c in classes:
        for _ in range(per_class):
            n += 1
            path = f"car_ims/{n:06d}.jpg"
            files[path] = image_bytes(n)
            records.append((path, 1, 2, 10, 11, c, int(n % 2 == 0)))
    write_tgz(root / "car_ims.tgz", files)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.empty((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, record in enumerate(records):
        annotations[0, i] = record
    class_names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return {"train": (3 * per_class, 3), "test": (3 * per_class, 3), "num_train_classes": 3}


def make_sop(root: Path) -> dict:
    """Stanford_Online_Products.zip: 4 train products, 3 test products, 2-3 images each."""
    files, rows = {}, {"train": [], "test": []}
    image_id = 0
    for split, products in (
        ("train", [(1, 2), (2, 3), (3, 2), (4, 2)]),
        ("test", [(11319, 2), (11320, 3), (11321, 2)]),
    ):
        for class_id, count in products:
            for j in range(count):
                image_id += 1
                path = f"bicycle_final/{class_id}00_{j}.JPG"
                files[f"Stanford_Online_Products/{path}"] = image_bytes(image_id)
                rows[split].append(f"{image_id} {class_id} 1 {path}")
    header = "image_id class_id super_class_id path\n"
    files["Stanford_Online_Products/Ebay_train.txt"] = (header + "\n".join(rows["train"]) + "\n").encode()
    files["Stanford_Online_Products/Ebay_test.txt"] = (header + "\n".join(rows["test"]) + "\n").encode()
    files["Stanford_Online_Products/Ebay_info.txt"] = b"image_id class_id super_class_id path\n"
    write_zip(root / "Stanford_Online_Products.zip", files)
    return {"train": (9, 4), "test": (7, 3), "num_train_classes": 4}


def make_inshop(root: Path) -> dict:
    """img.zip + Eval/list_eval_partition.txt: 3 train items; 3 test items with queries and gallery."""
    files, lines = {}, []
    n = 0
    plan = [
        (1, ["train"] * 3),
        (2, ["train"] * 2),
        (3, ["train"] * 3),
        (4, ["query", "gallery", "gallery"]),
        (5, ["query", "query", "gallery"]),
        (6, ["query", "gallery"]),
    ]
    for item, statuses in plan:
        for j, status in enumerate(statuses):
            n += 1
            path = f"img/WOMEN/Dresses/id_{item:08d}/{j + 1:02d}_1_front.jpg"
            files[path] = image_bytes(n)
            lines.append(f"{path}  id_{item:08d}  {status}")
    write_zip(root / "img.zip", files)
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    text = f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n"
    (root / "Eval" / "list_eval_partition.txt").write_text(text)
    return {"train": (8, 3), "test": (8, 3), "num_train_classes": 3, "queries": 4, "gallery": 4}


def make_omniglot(root: Path, per_character: int = 2) -> dict:
    """images_background.zip (3 alphabets) and images_evaluation.zip (2 alphabets), 2 characters each."""
    seed = 0
    for part, alphabets in (
        ("images_background", ["Alpha", "Beta", "Gamma"]),
        ("images_evaluation", ["Delta", "Eps"]),
    ):
        files = {}
        for alphabet in alphabets:
            for character in (1, 2):
                for drawer in range(per_character):
                    seed += 1
                    name = f"{part}/{alphabet}/character{character:02d}/{seed:04d}_{drawer + 1:02d}.png"
                    files[name] = image_bytes(seed, "PNG", "L", 16)
        write_zip(root / f"{part}.zip", files)
    return {
        "train": (3 * 2 * per_character, 3),
        "test": (2 * 2 * per_character, 2),
        "num_train_classes": 3,
        "test_characters": 4,
    }


BUILDERS = {
    "cub": make_cub,
    "cars": make_cars,
    "sop": make_sop,
    "inshop": make_inshop,
    "omniglot": make_omniglot,
}


def tiny_cub(data_dir: Path) -> list[str]:
    """Overrides that train on the CUB fixture under ``data_dir``: 3 training classes, 32 px crops."""
    return [
        "dataset=cub",
        f"paths.data_dir={data_dir}",
        "dataset.num_train_classes=3",
        "dataset.image_size=32",
        "dataset.resize_size=36",
        "dataset.batch_size=4",
        "dataset.samples_per_class=2",
        "dataset.download=false",
    ]
