"""Preparing a benchmark once: find or download its official archives, extract, check, index.

Every step that writes is all-or-nothing: downloads land in ``<file>.part`` and are renamed once their
checksum matches; archives extract into a temporary folder that is moved into place only when complete;
the index, written last, is what marks a prepared benchmark.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dml.errors import UserError
from dml.log import get_logger

log = get_logger(__name__)

INDEX_NAME = "dml_index.json"
INDEX_VERSION = 1


@dataclass(frozen=True)
class Archive:
    """One file of an official distribution.

    Attributes:
        filename: the file's official name (an archive, or a plain file such as ``cars_annos.mat``).
        provides: the file or folder it yields under the dataset root once in place.
        url: where it is published (``None`` when it cannot be fetched by a plain request).
        md5, sha256: its checksum, when known.
        source: where a person gets it, for the error message.
    """

    filename: str
    provides: str
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    source: str = ""

    @property
    def is_archive(self) -> bool:
        return self.filename.endswith((".tgz", ".tar.gz", ".tar", ".zip"))


def _checksum_ok(path: Path, archive: Archive) -> bool:
    if not (archive.md5 or archive.sha256):
        return True
    digest = hashlib.md5() if archive.md5 else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == (archive.md5 or archive.sha256)


def _download(archive: Archive, dest: Path) -> bool:
    """Fetch ``archive`` to ``dest``; False when it cannot be reached. A bad checksum is an error."""
    if archive.url is None:
        return False
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s from %s", archive.filename, archive.url)
    try:
        with urllib.request.urlopen(archive.url, timeout=30) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as e:
        part.unlink(missing_ok=True)
        log.info("could not download %s: %s", archive.url, e)
        return False
    if not _checksum_ok(part, archive):
        part.unlink(missing_ok=True)
        raise UserError(
            f"the download of {archive.filename} from {archive.url} does not match its published checksum; "
            f"try again, or get it from {archive.source or archive.url} and put it at {dest}"
        )
    part.replace(dest)
    return True


def _extract(path: Path, root: Path) -> None:
    """Unpack ``path`` into ``root`` through a temporary folder: all of it, or nothing."""
    tmp = Path(tempfile.mkdtemp(prefix=".extracting-", dir=root))
    try:
        try:
            if path.name.endswith(".zip"):
                with zipfile.ZipFile(path) as z:
                    z.extractall(tmp)
            else:
                with tarfile.open(path) as t:
                    t.extractall(tmp, filter="data")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise UserError(
                f"archive {path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and download it again"
            ) from e
        for entry in tmp.iterdir():
            target = root / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            entry.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_files(root: Path, name: str, archives: Iterable[Archive], download: bool = True) -> None:
    """Make sure every archive's ``provides`` exists under ``root``: extract or download as needed.

    Raises:
        UserError: a file is missing and cannot be downloaded (the message says which file, from where,
            and where to put it), or an archive is corrupt or fails its checksum.
    """
    root.mkdir(parents=True, exist_ok=True)
    missing = []
    for archive in archives:
        if (root / archive.provides).exists():
            continue
        path = root / archive.filename
        if not path.exists() and not (download and _download(archive, path)):
            missing.append(archive)
            continue
        if archive.is_archive:
            log.info("extracting %s", path)
            _extract(path, root)
            if not (root / archive.provides).exists():
                raise UserError(
                    f"{path} did not contain {archive.provides}; is it the official {name} archive?"
                )
    if missing:
        lines = [f"  - {a.filename}: from {a.source or a.url}" for a in missing]
        raise UserError(
            f"dataset {name} is not in {root}. Get these files and put them in {root} (archives may stay "
            "packed; they are extracted on first use):\n" + "\n".join(lines)
        )


def check_images(root: Path, paths: list[str], skip_bad: bool, name: str) -> set[str]:
    """The paths (relative to ``root``) that are missing or cannot be decoded.

    Raises:
        UserError: some are bad and ``skip_bad`` is false; the message names them.
    """
    bad = set()
    for rel in paths:
        try:
            with Image.open(root / rel) as image:
                image.load()
        except (OSError, SyntaxError, ValueError):
            bad.add(rel)
    if bad and not skip_bad:
        shown = "\n".join(f"  - {root / p}" for p in sorted(bad)[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UserError(
            f"{len(bad)} image(s) of {name} are missing or unreadable:\n{shown}{more}\n"
            "Download the dataset again, or set dataset.skip_bad_images=true to leave them out."
        )
    if bad:
        log.warning(
            "%s: left out %d missing or unreadable image(s) (dataset.skip_bad_images=true)", name, len(bad)
        )
    return bad


def write_index(root: Path, splits: dict[str, dict[str, list[Any]]], skipped: int) -> None:
    """Write the prepared splits atomically; its presence marks the benchmark as prepared."""
    path = root / INDEX_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": INDEX_VERSION, "skipped_images": skipped, "splits": splits}))
    tmp.replace(path)


def read_index(root: Path) -> dict[str, dict[str, list[Any]]] | None:
    """The prepared splits, or ``None`` when the benchmark has not been prepared (or by another version)."""
    path = root / INDEX_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data["splits"] if data.get("version") == INDEX_VERSION else None
