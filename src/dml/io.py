"""Files that are complete or absent: atomic writes, checks of an output before any work, file hashes.

- :func:`write_atomic` and :func:`atomic_path` write beside the target and rename into place, so a reader
  (or the next run) never sees half a file;
- :func:`check_output` refuses an output path that cannot be written (an existing output, a read-only
  folder, too little disk space, the process's file-size limit) before the work that fills it starts,
  and makes nothing while checking;
- :func:`file_sha256` identifies a file by its content (a model's checkpoint, say).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from dml.errors import UserError


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(path: Path, key: str, overwrite: bool, marker: str | None = None) -> None:
    """Refuse to replace what is at ``path`` unless ``overwrite``; even then, only what this package wrote
    (a file for a file; a folder holding ``marker`` for a folder), never a user's other data."""
    if not path.exists():
        return
    if not overwrite:
        raise UserError(f"{key}={str(path)!r} already exists; choose another path or set overwrite=true")
    if marker is None and path.is_dir():
        raise UserError(f"{key}={str(path)!r} is a folder; give the path of a file")
    if marker is not None and not (path / marker).is_file():
        raise UserError(
            f"{key}={str(path)!r} exists and is not an output of this package (no {marker}): refusing to "
            "replace it even with overwrite=true; choose another path"
        )


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n:,} bytes"


def unwritable(folder: Path, create: bool = False) -> str | None:
    """Why files cannot be written in ``folder`` (``None`` when they can). Without ``create``, a folder that
    does not exist yet is judged by the nearest one above it that does, and nothing is made; with it,
    the folder is made and a file written and removed in it."""
    if folder.exists() and not folder.is_dir():
        return "it is a file"
    if create or folder.is_dir():
        probe = folder / f".dml_write_test.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return str(e.strerror or e)
        return None
    above = next(p for p in folder.parents if p.exists())
    if not above.is_dir():
        return f"{above} is a file"
    if not os.access(above, os.W_OK | os.X_OK):  # a read-only file system too, for root
        return f"{above} cannot be written"
    return None


def check_folder(folder: Path, key: str, what: str | None = None) -> None:
    """Check that files can be written in ``folder`` (made later, if it does not exist yet).

    Raises:
        UserError: naming ``what`` (by default ``key=folder``) and saying to choose another folder for
            ``key``.
    """
    problem = unwritable(folder)
    if problem:
        shown = what or f"{key}={str(folder)!r}"
        raise UserError(f"{shown} cannot be written: {folder}: {problem}; choose a writable folder for {key}")


def check_space(path: Path, key: str, size: int, largest: int | None = None) -> None:
    """Check that the disk holding ``path``'s folder has ``size`` bytes free and that this process may
    write a file of that size (``ulimit -f``), or of ``largest`` when the output is several files.

    Raises:
        UserError: naming ``key`` and ``path``.
    """
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if size > free:
        raise UserError(
            f"{key}={str(path)!r} needs about {_size(size)} and {folder} has {_size(free)} free; free disk "
            f"space or choose another folder for {key}"
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    file_size = size if largest is None else largest
    if limit != resource.RLIM_INFINITY and file_size > limit:
        raise UserError(
            f"{key}={str(path)!r} needs about {_size(file_size)} in one file, over this process's file-size limit of "
            f"{_size(limit)} (ulimit -f); raise the limit or write less at once"
        )


def check_output(
    path: Path, key: str, overwrite: bool = False, size: int = 0, marker: str | None = None
) -> None:
    """Check, before any work, that ``path`` can receive an output of about ``size`` bytes; nothing is
    written or made.

    ``marker``: the output is a folder, recognised as this package's by that file (see
    :func:`refuse_existing`); otherwise a file.

    Raises:
        UserError: naming ``key``: ``path`` holds an output (or something else), its folder cannot be
            written, or it would not fit (see :func:`check_space`).
    """
    refuse_existing(path, key, overwrite, marker)
    check_folder(path.parent, key, f"{key}={str(path)!r}")
    check_space(path, key, size)


def write_failed(path: Path, reason: object) -> UserError:
    """The error for an output that could not be written (and was not left half-written)."""
    return UserError(
        f"could not write {path} ({reason}); no partial file was left. Free disk space or choose another folder"
    )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (a file or a folder): the package's one way to write an
    output. It replaces ``path`` only when the block ends normally and is removed otherwise, so a stopped
    run leaves nothing that looks complete. A file is renamed over the old one (readers see the old or the
    new, never half of one); a folder's old version is moved aside first, deleted once the new one is in
    place, and put back if that fails. The temporary names are the host's, the process's and this call's
    own (nodes may share a folder, containers repeat host names and process ids).

    Raises:
        UserError: writing failed (a full disk, say); the message names ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    own = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # containers repeat host and pid
    tmp = path.with_name(f".{path.name}.partial-{own}")
    aside = path.with_name(f".{path.name}.old-{own}")
    placed = False
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            os.replace(path, aside)
        os.replace(tmp, path)
        placed = True
    except OSError as e:
        raise write_failed(path, e.strerror or e) from e
    finally:
        if not placed and aside.exists() and not path.exists():
            with contextlib.suppress(OSError):  # the old output goes back (kept aside if even this fails)
                os.replace(aside, path)
        for leftover in (tmp, aside) if placed else (tmp,):
            with contextlib.suppress(OSError):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                elif leftover.exists():
                    leftover.unlink()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (utf-8) to ``path`` through :func:`atomic_path`: readers never see half a file.

    Raises:
        UserError: it could not be written; nothing is left at ``path`` or beside it.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
