"""Embeddings as a folder of shards, for catalogues too large for one file or one run.

A folder holds ``embeddings.json`` (what made the embeddings: the checkpoint and its hash, the metric,
the dimension; the inputs' count and the hash of their names, in order; the shard size; whether every
shard is there) and, for shard ``i`` of the inputs ``[i * shard_size, (i + 1) * shard_size)``:

- ``shard-<i>.parquet``: the names and labels of the images embedded, in order, and the checkpoint's
  hash and the images that could not be read in its metadata (a columnar file: pandas or pyarrow read it);
- ``shard-<i>.safetensors``: their vectors, float32, and the same hash.

Each file is written beside its target and renamed into place, the vectors last: a shard whose vectors
file exists is complete, any other is absent and written again. No shard holds more than one shard's
vectors in memory, and names never go into a file header (safetensors caps its header near 100 MB).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dml.errors import UserError
from dml.inference.embeddings import Embeddings
from dml.io import atomic_path, check_folder, write_atomic, write_failed

SHARDS_FORMAT = "dml-embedding-shards/1"
MANIFEST = "embeddings.json"


def shard_stem(i: int) -> str:
    return f"shard-{i:06d}"


def names_sha256(names: Sequence[str]) -> str:
    """The hash of a list of input names, in order: which inputs, and how they fall into shards."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class Manifest:
    """``embeddings.json``: what a shard folder holds and what made it."""

    checkpoint: str
    checkpoint_sha256: str
    metric: str
    dim: int
    inputs: int  # images to embed (the shards cover them in order)
    inputs_sha256: str  # names_sha256 of their names
    shard_size: int
    complete: bool = False
    count: int = 0  # embeddings written, once complete
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable images, once complete
    format: str = SHARDS_FORMAT

    @property
    def shards(self) -> int:
        return max(1, -(-self.inputs // self.shard_size))

    def shard_range(self, i: int) -> range:
        """The positions of the inputs shard ``i`` covers."""
        return range(i * self.shard_size, min(self.inputs, (i + 1) * self.shard_size))

    def write(self, folder: Path) -> None:
        write_atomic(folder / MANIFEST, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise UserError(
                f"{folder} holds no {MANIFEST}: it is not a folder of embeddings written by embed.py"
            )
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != SHARDS_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, not {SHARDS_FORMAT}")
            return cls(**raw)
        except (ValueError, TypeError) as e:
            raise UserError(f"{path} is damaged or not written by embed.py ({e})") from e


def complete_shards(folder: Path, manifest: Manifest) -> set[int]:
    """The shards whose vectors file exists (written last: the shard is complete)."""
    return {i for i in range(manifest.shards) if (folder / f"{shard_stem(i)}.safetensors").is_file()}


def write_shard(folder: Path, i: int, part: Embeddings, inputs_sha256: str) -> None:
    """Write shard ``i`` (its names and labels, then its vectors), each file complete or absent;
    ``inputs_sha256``: the folder's (its manifest's), so that a shard of another folder is told apart."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    stem = folder / shard_stem(i)
    meta = {
        "format": SHARDS_FORMAT,
        "shard": str(i),
        "checkpoint_sha256": part.checkpoint_sha256,
        "inputs_sha256": inputs_sha256,
    }
    table = pa.table({"name": pa.array(part.names, pa.string()), "label": pa.array(part.labels.numpy())})
    table = table.replace_schema_metadata(meta | {"skipped": json.dumps(part.skipped)})
    vectors = part.vectors.float().contiguous()
    for path, write in (
        (stem.with_suffix(".parquet"), lambda tmp: pq.write_table(table, str(tmp))),
        (
            stem.with_suffix(".safetensors"),
            lambda tmp: save_file({"vectors": vectors}, str(tmp), metadata=meta),
        ),
    ):
        with atomic_path(path) as tmp:
            try:
                write(tmp)
            except OSError:
                raise
            except Exception as e:  # pyarrow and safetensors report a failed write as their own errors
                raise write_failed(path, e) from e


def check_folder_for(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a folder embed.py cannot write its shards into (see :func:`start_folder`);
    nothing is made or changed."""
    if resume:
        if not (folder / MANIFEST).is_file():
            raise UserError(
                f"resume=true, but {folder} holds no unfinished embeddings ({MANIFEST}); drop resume"
            )
        old = Manifest.read(folder)
        if old.complete:
            raise UserError(f"{folder} is finished already ({old.count} embeddings): nothing to resume")
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"out={str(folder)!r} is a file; give a folder for the embedding shards")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / MANIFEST).is_file():
            raise UserError(
                f"out={str(folder)!r} holds other files and no {MANIFEST}: refusing to write shards among them; "
                "choose another folder"
            )
        if not overwrite:
            raise UserError(
                f"out={str(folder)!r} already holds embeddings; choose another folder, set overwrite=true, or "
                "resume=true to finish an unfinished one"
            )
    check_folder(folder, "out")


def start_folder(folder: Path, manifest: Manifest, resume: bool, overwrite: bool) -> set[int]:
    """Make a shard folder for ``manifest`` (or, with ``resume``, check the unfinished one there against
    it) and return the shards complete already.

    Raises:
        UserError: the folder exists (without ``overwrite`` or ``resume``), or holds something other
            than embed.py's shards; resuming, it holds none, is finished, or was started with another
            checkpoint, other images or another shard size.
    """
    check_folder_for(folder, resume, overwrite)
    if resume:
        old = Manifest.read(folder)
        if old.checkpoint_sha256 != manifest.checkpoint_sha256:
            raise UserError(
                f"resume=true with another checkpoint: {folder} was started with {old.checkpoint} (hash "
                f"{old.checkpoint_sha256[:12]}), and ckpt_path is {manifest.checkpoint} (hash "
                f"{manifest.checkpoint_sha256[:12]}); resume with the first, or embed into a new folder"
            )
        if (old.inputs, old.inputs_sha256) != (manifest.inputs, manifest.inputs_sha256):
            raise UserError(
                f"resume=true with other images: {folder} was started with {old.inputs} images and they are "
                f"{manifest.inputs} now, or their names differ; resume with the same images=, or embed into a "
                "new folder"
            )
        if old.shard_size != manifest.shard_size:
            raise UserError(
                f"resume=true with shard_size={manifest.shard_size}: {folder} was started with {old.shard_size}"
            )
        for leftover in folder.glob(".shard-*"):  # half-written files of the stopped run
            leftover.unlink()
        return complete_shards(folder, old)
    if (folder / MANIFEST).is_file():  # overwrite=true, checked above: what embed.py wrote there goes
        for old_file in [*folder.glob("shard-*"), *folder.glob(".shard-*")]:
            old_file.unlink()
        (folder / MANIFEST).unlink()
    folder.mkdir(parents=True, exist_ok=True)
    manifest.write(folder)
    return set()


def finish_folder(folder: Path, manifest: Manifest) -> Manifest:
    """Mark ``folder`` complete once every shard is there: the count and the unreadable images of all.

    Raises:
        UserError: a shard is not written (named), or none of the images could be read.
    """
    missing = sorted(set(range(manifest.shards)) - complete_shards(folder, manifest))
    if missing:
        raise UserError(
            f"shards {missing[:5]} of {folder} are not written: finish it with the same command and resume=true"
        )
    import pyarrow.parquet as pq

    count, skipped = 0, []
    for i in range(manifest.shards):
        try:
            meta = pq.read_metadata(str(folder / f"{shard_stem(i)}.parquet"))
        except Exception as e:  # any read failure: the file is damaged
            raise UserError(f"shard {i} of {folder} is damaged ({type(e).__name__}: {e}); embed again") from e
        count += meta.num_rows
        skipped += json.loads((meta.metadata or {}).get(b"skipped", b"[]").decode())
    if count == 0:
        listed = "; ".join(f"{s['path']} ({s['error']})" for s in skipped[:3])
        raise UserError(f"none of the {manifest.inputs} images could be read: {listed}")
    done = Manifest(**(asdict(manifest) | {"complete": True, "count": count, "skipped": skipped}))
    done.write(folder)
    return done


class ShardedEmbeddings:
    """A finished folder of shards, checked when opened: every shard there, of one model and one size.

    Raises:
        UserError: the folder is unfinished (say how to go on), or a shard is missing, damaged, of another
            model or of another dimension (each named).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"embeddings={str(folder)!r} is not a folder of embedding shards")
        self.manifest = m = Manifest.read(self.folder)
        if not m.complete:
            done = len(complete_shards(self.folder, m))
            raise UserError(
                f"{self.folder} is unfinished: {done} of its {m.shards} shards are written. Finish it with "
                "the same embed.py command and resume=true"
            )
        self.sizes = [self._check(i) for i in range(m.shards)]
        if sum(self.sizes) != m.count:
            raise UserError(
                f"the shards of {self.folder} hold {sum(self.sizes)} embeddings and {MANIFEST} says {m.count}: "
                "a shard was replaced; embed again into a new folder"
            )

    def _check(self, i: int) -> int:
        """Shard ``i``'s row count, its two files checked against each other and the manifest."""
        import pyarrow.parquet as pq
        from safetensors import safe_open

        stem = self.folder / shard_stem(i)
        names, vectors = stem.with_suffix(".parquet"), stem.with_suffix(".safetensors")
        for path in (names, vectors):
            if not path.is_file():
                raise UserError(
                    f"shard {i} of {self.folder} is missing ({path.name}); embed again, or copy the whole folder"
                )
        m = self.manifest
        try:
            meta = pq.read_metadata(str(names))
            rows, schema_meta = (
                meta.num_rows,
                {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()},
            )
            with safe_open(str(vectors), framework="pt") as f:
                vector_meta, shape = f.metadata() or {}, f.get_slice("vectors").get_shape()
        except Exception as e:  # any read failure: the file is damaged
            raise UserError(
                f"shard {i} of {self.folder} is damaged ({type(e).__name__}: {e}); embed again"
            ) from e
        for what, got in (("names", schema_meta), ("vectors", vector_meta)):
            if got.get("inputs_sha256") != m.inputs_sha256 or got.get("shard") != str(i):
                raise UserError(
                    f"the {what} of shard {i} of {self.folder} belong to another folder of embeddings (other "
                    "images, or another shard's place): a folder holds the shards of one run; embed again"
                )
            if got.get("checkpoint_sha256") != m.checkpoint_sha256:
                raise UserError(
                    f"the {what} of shard {i} of {self.folder} were made by another model than {m.checkpoint} "
                    f"(checkpoint hash {str(got.get('checkpoint_sha256'))[:12]}, not {m.checkpoint_sha256[:12]}): "
                    "a folder holds the shards of one model; embed again into a new folder"
                )
        if len(shape) != 2 or shape[1] != m.dim or shape[0] != rows:
            raise UserError(
                f"shard {i} of {self.folder} holds vectors of shape {tuple(shape)} for {rows} names, and the "
                f"folder's are {m.dim}-d: a folder holds shards of one size; embed again into a new folder"
            )
        return int(rows)

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def shard(self, i: int) -> Embeddings:
        """Shard ``i`` as :class:`Embeddings` (its vectors, names and labels)."""
        import pyarrow.parquet as pq
        from safetensors.torch import load_file

        stem = self.folder / shard_stem(i)
        table = pq.read_table(str(stem.with_suffix(".parquet")))
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        m = self.manifest
        return Embeddings(
            load_file(str(stem.with_suffix(".safetensors")))["vectors"],
            table.column("name").to_pylist(),
            torch.from_numpy(table.column("label").to_numpy().copy()).long(),
            m.checkpoint,
            m.checkpoint_sha256,
            m.metric,
            json.loads(meta.get("skipped", "[]")),
        )

    def vectors(self) -> Iterator[torch.Tensor]:
        """Each shard's vectors in order, one in memory at a time, without reading its names."""
        from safetensors.torch import load_file

        for i in range(self.manifest.shards):
            yield load_file(str(self.folder / f"{shard_stem(i)}.safetensors"))["vectors"]

    def names_and_labels(self) -> tuple[list[str], torch.Tensor]:
        """Every embedding's name and label, in order, read without the vectors."""
        import pyarrow.parquet as pq

        tables = [
            pq.read_table(str(self.folder / f"{shard_stem(i)}.parquet")) for i in range(self.manifest.shards)
        ]
        names = [name for t in tables for name in t.column("name").to_pylist()]
        labels = [torch.from_numpy(t.column("label").to_numpy().copy()).long() for t in tables]
        return names, torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)

    def shards(self) -> Iterator[Embeddings]:
        """Each shard in order, one in memory at a time."""
        for i in range(self.manifest.shards):
            yield self.shard(i)

    def load(self) -> Embeddings:
        """Every shard as one :class:`Embeddings` (all vectors in memory)."""
        parts = list(self.shards())
        m = self.manifest
        return Embeddings(
            torch.cat([p.vectors for p in parts]) if parts else torch.empty(0, m.dim),
            [name for p in parts for name in p.names],
            torch.cat([p.labels for p in parts]) if parts else torch.empty(0, dtype=torch.long),
            m.checkpoint,
            m.checkpoint_sha256,
            m.metric,
            m.skipped,
        )


def load_embeddings(path: str | Path) -> Embeddings:
    """Embeddings from a folder of shards or from one embeddings file (embed.py's earlier format)."""
    return ShardedEmbeddings(path).load() if Path(path).is_dir() else Embeddings.load(path)
