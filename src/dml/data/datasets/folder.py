"""A folder of classes: ``root/<class name>/**/<image>``, the layout of torchvision's ImageFolder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dml.data.datasets.custom import CustomImages, Item, stamp_of
from dml.errors import UserError
from dml.log import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


class FolderDataModule(CustomImages):
    """One subfolder of ``root`` per class, named by it (spaces and any letters allowed); the images of a
    class may sit in folders of their own inside it. Files of other kinds, and names starting with a dot,
    are passed over. See :class:`~dml.data.datasets.custom.CustomImages` for the split."""

    name = "folder"

    def __init__(self, root: str | None = None, **kwargs: Any):
        self.given_root = bool(root)
        super().__init__(root or ".", **kwargs)

    def list_items(self) -> tuple[list[Item], str]:
        if not self.given_root:
            raise UserError("dataset=folder needs dataset.root=<a folder holding one subfolder per class>")
        if not self.root.is_dir():
            raise UserError(
                f"dataset.root={self.root} is not a folder; give the folder that holds one subfolder of images "
                "per class"
            )
        items: list[Item] = []
        listing: list[tuple[str, int | None, int | None]] = []
        skipped = 0
        loose = [p.name for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    path = Path(dirpath) / filename
                    if filename.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                        skipped += 1
                        continue
                    rel = path.relative_to(self.root).as_posix()
                    try:
                        stat = path.stat()
                        listing.append((rel, stat.st_size, stat.st_mtime_ns))
                    except OSError:  # a broken link: listed, and named by the check as unreadable
                        listing.append((rel, None, None))
                    items.append(Item(rel, folder.name))
        if not items:
            hint = (
                f" ({len(loose)} images lie directly in it: move each class's images into a subfolder named "
                "by the class)"
                if loose
                else ""
            )
            raise UserError(f"dataset.root={self.root} has no class subfolders with images{hint}")
        if skipped or loose:
            log.info(
                "%s: passed over %d file(s) that are not images, and %d image(s) outside class folders",
                self.root,
                skipped,
                len(loose),
            )
        return items, stamp_of(listing)
