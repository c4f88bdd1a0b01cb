"""The embeddings file embed.py writes: one safetensors file, complete or absent."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dml.errors import UserError
from dml.io import atomic_path, refuse_existing, write_failed

EMBEDDINGS_FORMAT = "dml-embeddings/1"


@dataclass
class Embeddings:
    """Embeddings with what they are of and what made them.

    Attributes:
        vectors: (N, d) float32, L2-normalised for cosine models.
        names: one per row: an image file's path, or ``<dataset>:<split>/<position>`` for a dataset split.
        labels: (N,) int64 class ids, -1 where unknown (image folders).
        checkpoint, checkpoint_sha256: the model that embedded them.
        metric: ``cosine`` (unit vectors, inner product) or ``euclidean``.
        skipped: images that could not be read, ``{"path", "error"}`` each.
    """

    vectors: torch.Tensor
    names: list[str]
    labels: torch.Tensor
    checkpoint: str
    checkpoint_sha256: str
    metric: str = "cosine"
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write one safetensors file (atomically: complete or absent)."""
        from safetensors.torch import save_file

        path = Path(path)
        refuse_existing(path, "out", overwrite)
        metadata = {
            "format": EMBEDDINGS_FORMAT,
            "names": json.dumps(self.names),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "metric": self.metric,
            "skipped": json.dumps(self.skipped),
        }
        tensors = {"vectors": self.vectors.float().contiguous(), "labels": self.labels.long().contiguous()}
        with atomic_path(path) as tmp:
            try:
                save_file(tensors, str(tmp), metadata=metadata)
            except OSError:
                raise  # atomic_path says it in one line
            except Exception as e:  # safetensors reports a failed write as its own error
                raise write_failed(path, e) from e
        return path

    @staticmethod
    def file_size(count: int, dim: int) -> int:
        """The bytes at least that an embeddings file of ``count`` ``dim``-d vectors takes (vectors and
        labels; the names come on top)."""
        return count * (4 * dim + 8)

    @classmethod
    def load(cls, path: str | Path) -> Embeddings:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"embeddings file {str(path)!r} does not exist; write one with embed.py")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as e:  # any read failure means the same to the user
            raise UserError(f"{path} is not an embeddings file written by embed.py: {e}") from e
        if meta.get("format") != EMBEDDINGS_FORMAT or "vectors" not in tensors:
            raise UserError(
                f"{path} is not an embeddings file written by embed.py (format {meta.get('format')!r})"
            )
        return cls(
            tensors["vectors"],
            json.loads(meta["names"]),
            tensors["labels"],
            meta["checkpoint"],
            meta["checkpoint_sha256"],
            meta.get("metric", "cosine"),
            json.loads(meta.get("skipped", "[]")),
        )
