"""Which classes go to train, val and test: a seeded draw, a split file, or the split the data carry;
and the query/gallery roles of an evaluation split. Every split is class-disjoint, as the DML
protocols are."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from dml.errors import UserError

SPLITS = ("train", "val", "test")


def choose_classes(
    classes: list[str], test_classes: float, val_classes: int, seed: int, source: str
) -> dict[str, str]:
    """Class name -> ``train``, ``val`` or ``test``: ``test_classes`` (a share below 1, or a count) of the
    classes drawn for test, then ``val_classes`` of the rest for validation, by a generator seeded with
    ``seed`` (the same split for the same classes and seed).

    Raises:
        UserError: the draw would leave a split without classes.
    """
    n = len(classes)
    if n < 2:
        raise UserError(
            f"{source} has {n} class{'' if n == 1 else 'es'}; metric learning needs at least 2 (one to train "
            "on, one to test on): add classes"
        )
    count = round(test_classes * n) if 0 < test_classes < 1 else int(test_classes)
    if not 1 <= count <= n - 1 - val_classes:
        raise UserError(
            f"dataset.test_classes={test_classes} holds out {count} of the {n} classes of {source} for test "
            f"(and dataset.val_classes={val_classes} for validation); it must leave at least one for each "
            f"split: choose a share in (0, 1) or a count from 1 to {n - 1 - val_classes}"
        )
    ranked = shuffled(classes, seed)
    split = {name: "test" for name in ranked[:count]}
    split |= {name: "val" for name in ranked[count : count + val_classes]}
    return split | {name: "train" for name in ranked[count + val_classes :]}


def shuffled(classes: list[str], seed: int) -> list[str]:
    """The classes in an order drawn by a generator seeded with ``seed`` (the same for the same set)."""
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).tolist()
    names = sorted(classes)
    return [names[i] for i in order]


def read_split_file(path: Path) -> dict[str, str]:
    """A split file: JSON ``{"class": "train" | "val" | "test"}``, or CSV with a header ``class,split``.

    Raises:
        UserError: the file is missing or malformed, or names another split.
    """
    if not path.is_file():
        raise UserError(
            f"dataset.split_file={path} does not exist; give a JSON or CSV file of class -> split"
        )
    try:
        if path.suffix.lower() == ".json":
            mapping = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(mapping, dict):
                raise ValueError("not an object of class names")
            pairs = [(str(k), str(v)) for k, v in mapping.items()]
        else:
            with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
                rows = list(csv.DictReader(f))
            if rows and not {"class", "split"} <= set(rows[0]):
                raise ValueError(f"its header is {list(rows[0])}, not class,split")
            pairs = [(row["class"], row["split"]) for row in rows]
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(
            f'dataset.split_file={path} cannot be read ({e}); write JSON {{"class name": "train"}} or a CSV '
            "with the header class,split"
        ) from e
    out: dict[str, str] = {}
    for name, split in pairs:
        if split not in SPLITS:
            raise UserError(f"{path}: class {name!r} is put in {split!r}; the splits are {', '.join(SPLITS)}")
        if out.get(name, split) != split:
            raise UserError(
                f"{path} puts class {name!r} in both {out[name]} and {split}; a class has one split"
            )
        out[name] = split
    return out


def natural_order(name: str) -> tuple[int, int | str]:
    """Numbers in numeric order, then names."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def given_split(items: list[dict[str, Any]], source: Path) -> dict[str, str]:
    """The split the items carry (a table's column), per class; empty when they carry none."""
    out: dict[str, str] = {}
    for item in items:
        if item.get("split") is None:
            continue
        previous = out.setdefault(item["label"], item["split"])
        if previous != item["split"]:
            raise UserError(
                f"{source} puts class {item['label']!r} in both {previous} and {item['split']} (e.g. "
                f"{item['path']}); the splits must be class-disjoint"
            )
    if out and len(out) != len({item["label"] for item in items}):
        raise UserError(f"{source}: some rows have a split and others none; give every row a split")
    return out


def roles_of(members: list[dict[str, Any]], split: str, source: Path) -> torch.Tensor | None:
    """The query (0) / gallery (1) roles of a split's items, or None when each item queries the others."""
    roles = [m.get("role") for m in members]
    if all(r is None for r in roles) or all(r == 2 for r in roles):
        return None
    if any(r is None or r == 2 for r in roles):
        raise UserError(
            f"{source}: the {split} rows mix query-only or gallery-only items with items that are both (or "
            "unmarked); give each row exactly one of is_query / is_gallery, or mark them all as both"
        )
    return torch.tensor(roles, dtype=torch.long)
