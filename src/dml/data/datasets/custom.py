"""The user's own images (a folder of classes, or a table of files) as a benchmark: class-disjoint splits,
preparation checked and indexed once, and the split kept with the run.

A reader (:class:`~dml.data.datasets.folder.FolderDataModule`, :class:`~dml.data.datasets.table.TableDataModule`)
lists :class:`Item` s: a file, its class name, and optionally the split and the query/gallery role the user
gave it. Preparation checks that every file exists and decodes, hashes its bytes (the same image in train
and test is reported) and writes an index, stamped by what it was made from, so that a changed folder or
table is prepared again. The split is decided per class: the user's own (a split file, the table's
``split`` column), else a seeded share or count of the classes (``test_classes``), and ``val_classes``
more held out of training for model selection. The datamodule's ``state_dict`` (saved in every
checkpoint) holds the split and the class ids, so that evaluate.py, embed.py and a resume read the same
classes as training did.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import track

from dml.data.datasets.benchmark import FileBenchmark, ImageFiles
from dml.data.datasets.class_split import (
    SPLITS,
    choose_classes,
    given_split,
    natural_order,
    read_split_file,
    roles_of,
    shuffled,
)
from dml.data.preparation import cache_path, check_image, resized_copy
from dml.data.splits import RawSplit
from dml.errors import UserError
from dml.io import write_atomic
from dml.log import get_logger

log = get_logger(__name__)

INDEX_FORMAT = "dml custom index 1"


@dataclass(frozen=True)
class Item:
    """One image of the user's data: ``path`` relative to the image root, its class name, and what the user
    said of it (``split``: train, val or test; ``role``: 0 query, 1 gallery, 2 both), or None."""

    path: str
    label: str
    split: str | None = None
    role: int | None = None


class CustomImages(FileBenchmark):
    """Base of the user-data benchmarks (see the module's docstring).

    Args:
        root: the folder the images are read from (and where the index and the resized copy go).
        test_classes: a share (below 1) or a number of the classes held out for test, drawn with
            ``split_seed``; unused when the split is given (``split_file``, a table's ``split`` column).
        split_seed: the seed of that draw (and of ``val_classes``'s).
        split_file: a JSON or CSV file mapping every class to ``train``, ``val`` or ``test``.
        **kwargs: see :class:`~dml.data.datasets.benchmark.FileBenchmark`; ``val_classes`` classes are
            drawn from the training classes (seeded), not taken from the end.
    """

    draws_val_classes = True  # val_classes drawn here, seeded, with the test classes

    def __init__(
        self,
        root: str,
        test_classes: float = 0.5,
        split_seed: int = 0,
        split_file: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(root, **kwargs)
        if self.val_classes < 0:
            raise UserError(f"dataset.val_classes={self.val_classes} must be 0 or more")
        if test_classes <= 0:
            raise UserError(f"dataset.test_classes={test_classes} must be a share in (0, 1) or a count >= 1")
        self.test_classes, self.split_seed = test_classes, split_seed
        self.split_file = Path(split_file).expanduser() if split_file else None
        self._stored: dict[str, Any] | None = None  # the split of a checkpoint (load_state_dict)
        self._assignment: dict[str, str] = {}
        self._class_ids: dict[str, int] = {}
        self._prepared: dict[str, Any] | None = None
        self._split_members: dict[str, list[dict[str, Any]]] | None = None

    # --- for subclasses -------------------------------------------------------------------------------
    def list_items(self) -> tuple[list[Item], str]:
        """Every image and what the user said of it, and a stamp of what they were listed from (changes
        when the folder or table does)."""
        raise NotImplementedError

    @property
    def source(self) -> Path:
        """The folder or table the items come from (named in messages; its index is kept beside it)."""
        return self.root

    @property
    def index_path(self) -> Path:
        return self.root / "dml_index.json"

    # --- preparation ----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._index()
        self._image_root()

    def _index(self) -> dict[str, Any]:
        """The prepared index: read when its stamp is the data's, else made (every file checked); once
        per datamodule."""
        if self._prepared is not None:
            return self._prepared
        self._prepared = self._read_or_make_index()
        return self._prepared

    def _read_or_make_index(self) -> dict[str, Any]:
        items, stamp = self.list_items()
        if not items:
            raise UserError(
                f"{self.source} holds no images; see docs/own-images.md for the layouts dml reads"
            )
        for path in self._index_places():
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if index.get("format") == INDEX_FORMAT and index.get("stamp") == stamp:
                return index
        bad, hashes = [], {}
        for item in track(
            items, description=f"checking {len(items)} images of {self.source}", transient=True
        ):
            digest = check_image(self.root / item.path)
            if digest is None:
                bad.append(item.path)
            else:
                hashes[item.path] = digest
        if bad and not self.skip_bad_images:
            shown = "\n".join(f"  - {self.root / p}" for p in sorted(bad)[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise UserError(
                f"{len(bad)} image(s) of {self.source} are missing or unreadable:\n{shown}{more}\n"
                "Replace or remove them, or set dataset.skip_bad_images=true to leave them out."
            )
        if bad:
            log.warning("%s: left out %d missing or unreadable image(s)", self.source, len(bad))
        kept = [asdict(item) | {"hash": hashes[item.path]} for item in items if item.path in hashes]
        index = {"format": INDEX_FORMAT, "stamp": stamp, "skipped_images": len(bad), "items": kept}
        for path in self._index_places():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(index))
                break
            except (OSError, UserError) as e:  # a read-only folder: the cache keeps it
                log.info("cannot write the index %s (%s)", path, e)
        else:
            log.warning(
                "%s: the index could not be written anywhere; it is checked again next time", self.source
            )
        return index

    def _index_places(self) -> list[Path]:
        """Where the index goes: beside the data, else (read-only data) under ``$DML_CACHE``."""
        return [self.index_path, cache_path("index", self.source) / self.index_path.name]

    def _image_root(self) -> Path:
        """The folder the images are read from: called when the splits are built, once the backbone has
        filled the preprocessing (the resized copy's size is its resize)."""
        if not self.resized_cache:
            return self.root
        self.preprocessing()
        assert self.resize_size is not None  # set just above
        index = self._index()
        paths = [item["path"] for item in index["items"]]
        return resized_copy(self.root, paths, self.resize_size, key=index["stamp"])

    # --- the split ------------------------------------------------------------------------------------
    def training_classes(self) -> int:
        return len({m["label"] for m in self._members()["train"]})

    def load_raw(self) -> dict[str, RawSplit]:
        images, raw = self._image_root(), {}
        for split, members in self._members().items():
            if split == "val" and not members:
                continue
            raw[split] = RawSplit(
                ImageFiles(images, [m["path"] for m in members]),
                torch.tensor([self._class_ids[m["label"]] for m in members], dtype=torch.long),
                roles=roles_of(members, split, self.source) if split == "test" else None,
            )
        return raw

    def _members(self) -> dict[str, list[dict[str, Any]]]:
        """The items of train, val and test, once: classes placed, and those that cannot serve dropped."""
        if self._split_members is not None:
            return self._split_members
        items = self._index()["items"]
        counts = Counter(item["label"] for item in items)
        if max(counts.values()) < 2:
            raise UserError(
                f"every class of {self.source} has a single image; a class needs two at least (an image to find "
                "and another to find it with): add images"
            )
        if self._stored is not None:
            self._assignment, self._class_ids = self._stored_split(items)
            items = [item for item in items if item["label"] in self._assignment]
        else:
            names = sorted(counts, key=natural_order)
            self._class_ids = {name: i for i, name in enumerate(names)}
            self._assignment = self._split_of_classes(items, {n for n, c in counts.items() if c < 2})
        by_split: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
        for item in items:
            split = self._assignment[item["label"]]
            if split in by_split:
                by_split[split].append(item)
        self._report_duplicates(by_split)
        by_split["train"] = self._enough_for_training(by_split["train"])
        if not by_split["test"]:
            raise UserError(f"{self.source}: no test class has two images or more; add images to them")
        if self.val_classes and not by_split["val"]:
            raise UserError(f"{self.source}: no validation class has two images or more; add images to them")
        self._split_members = by_split
        return by_split

    def _stored_split(self, items: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, int]]:
        """A checkpoint's split and class ids, checked against the data: the run's classes must be there
        (those it left out need not); classes added since are left out."""
        assert self._stored is not None
        stored, classes = dict(self._stored["split"]), {item["label"] for item in items}
        missing = sorted(name for name, split in stored.items() if split != "dropped" and name not in classes)
        if missing:
            raise UserError(
                f"{self.source} no longer has classes the checkpoint was trained and tested with "
                f"({', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}); give the data the run "
                "used, or evaluate on other data with dataset=folder or dataset=table on the command line (a new "
                "split is drawn)"
            )
        new = sorted(classes - set(stored))
        if new:
            log.warning(
                "%s has %d class(es) the checkpoint's run did not have (e.g. %s): left out, the run's split is kept",
                self.source,
                len(new),
                ", ".join(repr(name) for name in new[:3]),
            )
        return stored, dict(self._stored["class_ids"])

    def _split_of_classes(self, items: list[dict[str, Any]], single: set[str]) -> dict[str, str]:
        """Each class's split: given (a split file, the data's split column) or drawn; ``single``: the
        classes of one image, which no split can use (a query needs another image of its class)."""
        classes = sorted({item["label"] for item in items} - single)
        if single:
            log.warning(
                "%s: %d class(es) have a single image (e.g. %s): left out, a class needs two",
                self.source,
                len(single),
                ", ".join(repr(name) for name in sorted(single)[:3]),
            )
        dropped = dict.fromkeys(single, "dropped")
        given = given_split(items, self.source)
        if self.split_file is not None:
            if given:
                raise UserError(
                    f"{self.source} has a split column and dataset.split_file={self.split_file} is set: keep one"
                )
            given = read_split_file(self.split_file)
            unknown = sorted(set(given) - set(classes) - single)
            if unknown:
                raise UserError(
                    f"dataset.split_file={self.split_file} names classes {self.source} does not have: "
                    f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}"
                )
            unplaced = sorted(set(classes) - set(given))
            if unplaced:
                raise UserError(
                    f"dataset.split_file={self.split_file} does not place classes "
                    f"{', '.join(map(repr, unplaced[:5]))}{' ...' if len(unplaced) > 5 else ''}: give every class "
                    "a split"
                )
        if not given:
            return dropped | choose_classes(
                classes, self.test_classes, self.val_classes, self.split_seed, str(self.source)
            )
        given = {name: split for name, split in given.items() if name not in single}
        if self.val_classes and "val" in given.values():
            raise UserError(
                f"the split of {self.source} already names val classes; set dataset.val_classes=0"
            )
        train = [name for name, split in given.items() if split == "train"]
        if not train or "test" not in given.values():
            raise UserError(f"the split of {self.source} needs train and test classes")
        if self.val_classes >= len(train):
            raise UserError(
                f"dataset.val_classes={self.val_classes} must be below the {len(train)} training classes that the "
                f"split of {self.source} gives"
            )
        # validation classes drawn from the given training classes, as from a folder's
        return dropped | given | dict.fromkeys(shuffled(train, self.split_seed)[: self.val_classes], "val")

    def _enough_for_training(self, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The training items of classes with enough images for a batch's share (K, or 2 for pairs)."""
        need = self.samples_per_class if self.sampler == "class_balanced" else 2
        counts = Counter(m["label"] for m in members)
        small = {name for name, count in counts.items() if count < need}
        if small:
            log.warning(
                "%s: %d training class(es) have fewer than %d images (e.g. %s) and are left out of training",
                self.source,
                len(small),
                need,
                ", ".join(repr(name) for name in sorted(small)[:3]),
            )
            for name in small:
                self._assignment[name] = "dropped"
        kept = [m for m in members if m["label"] not in small]
        classes = len(counts) - len(small)
        per_batch = self.batch_size // self.samples_per_class if self.sampler == "class_balanced" else 2
        if classes < max(per_batch, 2):
            raise UserError(
                f"{self.source}: {classes} training class(es) have at least {need} images, but a batch needs "
                f"{max(per_batch, 2)} (dataset.batch_size={self.batch_size}, samples_per_class="
                f"{self.samples_per_class}); add images, lower dataset.samples_per_class or dataset.batch_size, "
                "or give more classes to training"
            )
        return kept

    def _report_duplicates(self, by_split: dict[str, list[dict[str, Any]]]) -> None:
        seen = {m["hash"]: m["path"] for m in by_split["train"]}
        same = [
            (seen[m["hash"]], m["path"])
            for split in ("val", "test")
            for m in by_split[split]
            if m["hash"] in seen
        ]
        if same:
            log.warning(
                "%s: %d image(s) of the evaluation classes have the same content as training images (e.g. %s); "
                "they inflate the results: remove the copies",
                self.source,
                len(same),
                "; ".join(f"{a} = {b}" for a, b in same[:3]),
            )

    # --- with the run ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The split (class -> train, val, test or dropped) and the class ids: saved in every checkpoint."""
        return (
            {"split": dict(self._assignment), "class_ids": dict(self._class_ids)} if self._assignment else {}
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Read the classes as a checkpoint's run did (call before :meth:`setup`)."""
        if state_dict:
            self._stored = {"split": dict(state_dict["split"]), "class_ids": dict(state_dict["class_ids"])}

    def class_names(self) -> dict[int, str]:
        """Each class id's name (its folder's, or the table's label)."""
        self._members()
        return {i: name for name, i in self._class_ids.items()}

    def split_description(self) -> dict[str, Any]:
        """What ``split.json`` in a run folder says: each split's classes, and the class ids."""
        self._members()
        return {
            "source": str(self.source),
            "classes": {
                split: sorted((n for n, s in self._assignment.items() if s == split), key=natural_order)
                for split in (*SPLITS, "dropped")
            },
            "class_ids": self._class_ids,
        }


def stamp_of(parts: list[Any]) -> str:
    """A short digest of what an index was made from."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()
