"""A table of files: CSV (or TSV, Parquet) with the columns ``path`` and ``label``, and optionally ``split``,
``is_query`` and ``is_gallery``: open-metric-learning's dataset format, read as it is."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

from dml.data.datasets.custom import CustomImages, Item, stamp_of
from dml.errors import UserError
from dml.log import get_logger

log = get_logger(__name__)

REQUIRED = ("path", "label")
SPLIT_NAMES = {"train": "train", "val": "val", "test": "test", "validation": "test"}  # OML: validation
TRUE, FALSE = {"true", "1", "1.0", "yes", "t", "y"}, {"false", "0", "0.0", "no", "f", "n"}
BOXES = ("x_1", "y_1", "x_2", "y_2")  # open-metric-learning's bounding boxes, which dml does not apply


class TableDataModule(CustomImages):
    """The images a table lists, by class (``label``: whole numbers or names).

    Paths are relative to ``root`` when it is given, else to the table's folder. ``split`` (train, val,
    test; open-metric-learning's ``validation`` is read as test) fixes the split of each row's class, and
    must keep classes apart; without it the classes are split as a folder's are. ``is_query`` and
    ``is_gallery`` give the evaluation rows roles: queries search the gallery (In-Shop's protocol); rows
    that are both query and gallery search every other row.

    Args:
        table: the table file (``.csv``, ``.tsv`` or ``.parquet``; Parquet needs pyarrow).
        root: the folder the paths are relative to; null: the table's folder.
        **kwargs: see :class:`~dml.data.datasets.custom.CustomImages`.
    """

    name = "table"

    def __init__(self, table: str | None = None, root: str | None = None, **kwargs: Any):
        self.table = Path(table or "").expanduser()
        super().__init__(str(Path(root).expanduser() if root else self.table.parent), **kwargs)

    @property
    def source(self) -> Path:
        return self.table

    @property
    def index_path(self) -> Path:
        return self.table.with_name(f"{self.table.name}.dml_index.json")

    def list_items(self) -> tuple[list[Item], str]:
        if self.table == Path(""):
            raise UserError(
                "dataset=table needs dataset.table=<a .csv, .tsv or .parquet file of path,label rows>"
            )
        rows = read_rows(self.table)
        items: list[Item] = []
        listing: list[tuple] = []
        seen: dict[str, int] = {}
        missing: list[str] = []
        for number, row in rows:
            path, label = (row.get(column) for column in REQUIRED)
            if not path or not label:
                raise UserError(
                    f"{self.table}, row {number}: the {'path' if not path else 'label'} is empty; every row needs "
                    "a path and a label"
                )
            if path in seen:
                raise UserError(
                    f"{self.table}: rows {seen[path]} and {number} both list {path}; list each image once"
                )
            seen[path] = number
            split = _split(row.get("split"), self.table, number)
            item = Item(path, label, split, _role(row, self.table, number) if split != "train" else None)
            file = self.root / path
            try:
                stat = file.stat()
            except OSError:
                missing.append(f"row {number}: {file}")
                stat = None
            if stat is not None or self.skip_bad_images:
                items.append(item)
                listing.append(
                    (path, label, split, item.role, stat and stat.st_size, stat and stat.st_mtime_ns)
                )
        if missing and not self.skip_bad_images:
            shown = "\n".join(f"  - {m}" for m in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise UserError(
                f"{len(missing)} file(s) that {self.table} lists do not exist (paths are relative to {self.root}"
                f"{'' if self.root != self.table.parent else ', the table' + chr(39) + 's folder; set dataset.root otherwise'}):"
                f"\n{shown}{more}\nFix the paths, or set dataset.skip_bad_images=true to leave those rows out."
            )
        digest = hashlib.sha1(self.table.read_bytes()).hexdigest()
        return items, stamp_of([digest, str(self.root), listing])


def read_rows(table: Path) -> list[tuple[int, dict[str, str | None]]]:
    """The table's rows (numbered as a spreadsheet shows them: the header is row 1) as text or None.

    Raises:
        UserError: the file is missing, unreadable, of another format, or lacks a required column.
    """
    if not table.is_file():
        raise UserError(f"dataset.table={table} does not exist; give a .csv, .tsv or .parquet file")
    suffix = table.suffix.lower()
    try:
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise UserError(f"reading {table} needs pyarrow: pip install pyarrow (or give a CSV)") from e
            columns = pq.read_table(table).to_pydict()
            names = list(columns)
            count = len(next(iter(columns.values()))) if columns else 0
            records = [{k: columns[k][i] for k in names} for i in range(count)]
        elif suffix in (".csv", ".tsv"):
            with table.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                names = list(reader.fieldnames or [])
                records = list(reader)
        else:
            raise UserError(f"dataset.table={table}: give a .csv, .tsv or .parquet file")
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise UserError(f"dataset.table={table} cannot be read ({type(e).__name__}: {e})") from e
    absent = [c for c in REQUIRED if c not in names]
    if absent:
        raise UserError(
            f"{table} has no {' and no '.join(absent)} column (its columns: {', '.join(names) or 'none'}); "
            "a table needs path and label, and may have split, is_query and is_gallery"
        )
    if set(BOXES) <= set(names):
        log.warning(
            "%s has bounding boxes (x_1, y_1, x_2, y_2): dml uses the images whole, not cropped to them",
            table,
        )
    return [
        (number, {k: _text(v) for k, v in record.items()}) for number, record in enumerate(records, start=2)
    ]


def _text(value: Any) -> str | None:
    """A cell as text: None when empty; a whole float (a Parquet or pandas label, 3.0) as a whole number."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _split(value: str | None, table: Path, number: int) -> str | None:
    if value is None:
        return None
    if value.lower() not in SPLIT_NAMES:
        raise UserError(
            f"{table}, row {number}: split {value!r} is not one of train, val, test (or validation, read as test)"
        )
    return SPLIT_NAMES[value.lower()]


def _flag(row: dict[str, str | None], column: str, table: Path, number: int) -> bool | None:
    value = row.get(column)
    if value is None:
        return None
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise UserError(f"{table}, row {number}: {column}={value!r} is not true or false")


def _role(row: dict[str, str | None], table: Path, number: int) -> int | None:
    """0 query, 1 gallery, 2 both; None when the row says neither."""
    query, gallery = _flag(row, "is_query", table, number), _flag(row, "is_gallery", table, number)
    if query is None and gallery is None:
        return None
    if not query and not gallery:
        raise UserError(
            f"{table}, row {number}: is_query and is_gallery are both false; an evaluation row is a query, a "
            "gallery item or both"
        )
    return 2 if query and gallery else 0 if query else 1
