"""Preparing a benchmark once: find or download its official archives, extract, check, index.

Every step that writes is all-or-nothing (:func:`dml.io.atomic_path`): downloads are renamed into place
once their checksum matches; archives extract into a temporary folder that is moved into place only when complete;
the index, written last, is what marks a prepared benchmark.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
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

from dml.data.images import convert, to_8bit
from dml.errors import UserError
from dml.io import atomic_path, write_atomic
from dml.log import get_logger

log = get_logger(__name__)

INDEX_NAME = "dml_index.json"
INDEX_VERSION = 1
# Beside what an archive provides: which archive file (size, mtime) it was extracted from.
EXTRACTED_SUFFIX = ".dml_extracted"


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
    log.info("downloading %s from %s", archive.filename, archive.url)
    try:
        with atomic_path(dest) as part:  # in place only once complete and checked
            try:
                with urllib.request.urlopen(archive.url, timeout=30) as response, open(part, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
            except OSError as e:
                raise _Unreachable(e) from e
            if not _checksum_ok(part, archive):
                raise UserError(
                    f"the download of {archive.filename} from {archive.url} does not match its published "
                    f"checksum; try again, or get it from {archive.source or archive.url} and put it at {dest}"
                )
    except _Unreachable as e:
        log.info("could not download %s: %s", archive.url, e)
        return False
    return True


class _Unreachable(Exception):
    """The archive's URL could not be read (no network, a dead link)."""


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
        for entry in tmp.iterdir():  # each in place at once; an earlier extraction's stays until then
            with atomic_path(root / entry.name) as place:
                entry.replace(place)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_files(root: Path, name: str, archives: Iterable[Archive], download: bool = True) -> None:
    """Make sure every archive's ``provides`` exists under ``root``: extract or download as needed.

    Raises:
        UserError: a file is missing and cannot be downloaded (the message says which file, from where,
            and where to put it), or an archive is corrupt or fails its checksum.
    """
    if root.exists() and not root.is_dir():
        raise UserError(
            f"the dataset folder {root} is a file; point dataset.root (or paths.data_dir) at a folder"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the dataset folder {root} ({e.strerror or e}); check paths.data_dir / dataset.root"
        ) from e
    missing = []
    for archive in archives:
        path = root / archive.filename
        if (root / archive.provides).exists() and not _replaced_since_extraction(root, archive):
            continue
        if not path.exists() and not (download and _download(archive, path)):
            missing.append(archive)
            continue
        if archive.is_archive:
            log.info("extracting %s", path)
            _extract(path, root)
            write_atomic(_marker(root, archive), json.dumps(_stamp(path)))
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


def _marker(root: Path, archive: Archive) -> Path:
    return root / f".{Path(archive.provides).name}{EXTRACTED_SUFFIX}"


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _replaced_since_extraction(root: Path, archive: Archive) -> bool:
    """True when the archive now in ``root`` is not the one its extracted folder came from (the user
    put a new archive in place after a failed preparation): the folder is then extracted again."""
    path, marker = root / archive.filename, _marker(root, archive)
    if not archive.is_archive or not path.is_file() or not marker.is_file() or not os.access(root, os.W_OK):
        return False  # extracted by hand (delete the folder to extract again), or a read-only copy
    try:
        return json.loads(marker.read_text()) != _stamp(path)
    except (OSError, json.JSONDecodeError):
        return True


def check_image(path: Path) -> str | None:
    """A digest of the file's bytes when it decodes to pixels with an 8-bit meaning, else None (missing,
    damaged, or of pixels dml does not read)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            to_8bit(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return hashlib.blake2b(data, digest_size=10).hexdigest()


def check_images(root: Path, paths: list[str], skip_bad: bool, name: str) -> set[str]:
    """The paths (relative to ``root``) that are missing or cannot be decoded.

    Raises:
        UserError: some are bad and ``skip_bad`` is false; the message names them.
    """
    bad = {rel for rel in paths if check_image(root / rel) is None}
    if bad and not skip_bad:
        shown = "\n".join(f"  - {root / p}" for p in sorted(bad)[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UserError(
            f"{len(bad)} image(s) of {name} are missing or unreadable:\n{shown}{more}\n"
            f"Put a good copy of the official archive in {root} (a folder dml extracted is extracted again "
            "from a new archive; delete one you extracted yourself), or set dataset.skip_bad_images=true to "
            "leave them out."
        )
    if bad:
        log.warning(
            "%s: left out %d missing or unreadable image(s) (dataset.skip_bad_images=true)", name, len(bad)
        )
    return bad


def cache_path(kind: str, root: Path) -> Path:
    """``$DML_CACHE`` (default ``~/.cache/dml``) / kind / <hash of the dataset folder's path>: where what
    dml writes beside a dataset goes when the dataset's folder is read-only."""
    cache = Path(
        os.environ.get("DML_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dml"
    )
    return cache / kind / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]


def index_cache_path(root: Path) -> Path:
    """Where the index of a dataset in a read-only folder goes: :func:`cache_path` / dml_index.json."""
    return cache_path("index", root) / INDEX_NAME


def resized_copy(
    root: Path, paths: list[str], short_side: int, quality: int = 90, key: str | None = None
) -> Path:
    """A one-time copy of the images ``paths`` (relative to ``root``) with their shorter side brought down
    to ``short_side`` (RGB, JPEG quality ``quality``; smaller ones are copied as they are): the fast
    path's smaller, faster-to-decode files. Kept in ``root/.dml_resized_<short_side>``, or under
    :func:`cache_path` when ``root`` is read-only; files are written atomically, so a stopped copy goes
    on where it stopped, and ``complete.json`` marks a finished one. ``key``: a stamp of the images (a
    user's folder, which changes): another key brings the copy up to date, every image newer than its
    copy copied again. Returns the copy's folder.
    """
    settings = {"images": len(paths), "short_side": short_side, "quality": quality, "key": key}
    for folder in (root / f".dml_resized_{short_side}", cache_path("resized", root) / str(short_side)):
        marker = folder / "complete.json"
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(marker.read_text()) == settings:
                return folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".writable").touch()
        except OSError:
            continue
        log.info(
            "writing a copy of %d images resized to a shorter side of %d px in %s",
            len(paths),
            short_side,
            folder,
        )
        for rel in paths:
            out = folder / rel
            if out.is_file() and (key is None or out.stat().st_mtime_ns >= (root / rel).stat().st_mtime_ns):
                continue
            with Image.open(root / rel) as image:  # read before the write starts: its errors are the file's
                scale = short_side / min(image.size)
                resized = None
                if scale < 1:
                    size = tuple(max(1, round(side * scale)) for side in image.size)
                    resized = convert(image, "RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
            with atomic_path(out) as tmp:
                if resized is not None:
                    resized.save(tmp, "JPEG", quality=quality)
                else:
                    shutil.copyfile(root / rel, tmp)  # small enough already: the file as it is
        write_atomic(marker, json.dumps(settings))
        return folder
    raise UserError(
        f"cannot write the resized copy of {root} there nor in {cache_path('resized', root)}; make one of them "
        "writable, set DML_CACHE=<writable folder>, or set dataset.resized_cache=false"
    )


def write_index(root: Path, splits: dict[str, dict[str, list[Any]]], skipped: int) -> Path:
    """Write the prepared splits atomically; its presence marks the benchmark as prepared.

    The index goes in ``root``; when that folder is read-only (a shared copy of the dataset), in
    :func:`index_cache_path`. Returns where it went.
    """
    text = json.dumps({"version": INDEX_VERSION, "skipped_images": skipped, "splits": splits})
    for path in (root / INDEX_NAME, index_cache_path(root)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text)
        except (OSError, UserError) as e:
            log.info("cannot write the index %s (%s)", path, getattr(e, "strerror", None) or e)
            continue
        if path.parent != root:
            log.info("%s is read-only: its index is kept in %s", root, path)
        return path
    raise UserError(
        f"cannot write the dataset index in {root} nor in {index_cache_path(root).parent}; make one of them "
        "writable, or set DML_CACHE=<writable folder>"
    )


def read_index(root: Path) -> dict[str, dict[str, list[Any]]] | None:
    """The prepared splits, or ``None`` when the benchmark has not been prepared (or by another version)."""
    for path in (root / INDEX_NAME, index_cache_path(root)):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("version") == INDEX_VERSION:
            return data["splits"]
    return None
