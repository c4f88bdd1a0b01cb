"""Exporting the embedding model: ONNX and TorchScript, with its preprocessing in a JSON file."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dml.errors import UserError
from dml.inference.embedder import Embedder
from dml.io import atomic_path, refuse_existing


class EmbeddingModel(nn.Module):
    """Backbone + head (+ L2 normalisation, for cosine models): preprocessed images -> embeddings."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def preprocessing(embedder: Embedder) -> dict[str, Any]:
    """What an exported model expects its input to be: the steps and values of the checkpoint's
    :class:`~dml.data.preprocessing.Preprocessing`, enough to re-implement them without dml."""
    return embedder.datamodule.preprocessing().to_json()


FORMATS = ("onnx", "torchscript")


def export_formats(formats: str | Sequence[str]) -> list[str]:
    """``formats`` as a list: a list as it is, a string as one name or comma-separated names.

    Raises:
        UserError: a name that is not a format, or none at all.
    """
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(
            f"formats={formats}: choose from {', '.join(FORMATS)} (a list: formats=[onnx,torchscript])"
        )
    return formats


def export(
    embedder: Embedder,
    out: str | Path,
    formats: Sequence[str] = ("onnx", "torchscript"),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``out/model.onnx`` (dynamic batch axis) and/or ``out/model.torchscript.pt`` with
    ``out/preprocessing.json``; all or nothing. ``formats``: a list, or one name or a comma-separated
    string of them (``onnx``, ``onnx,torchscript``)."""
    formats = export_formats(formats)
    out = Path(out)
    refuse_existing(out, "out", overwrite, marker="preprocessing.json")
    # A copy on the CPU: the embedder's own model stays where it runs.
    model = copy.deepcopy(EmbeddingModel(embedder.module.backbone, embedder.module.head)).cpu().eval()
    pre = preprocessing(embedder)
    example = torch.randn(2, pre["channels"], *embedder.datamodule.preprocessing().input_size)
    written = {}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if "onnx" in formats:
            try:
                import onnx  # noqa: F401
            except ImportError as e:
                raise UserError("ONNX export needs the onnx extra: pip install 'dml[onnx]'") from e
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                model,
                (example,),
                str(tmp / "model.onnx"),
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_shapes={"images": {0: batch}},
                dynamo=True,
                external_data=False,
            )
            written["onnx"] = out / "model.onnx"
        if "torchscript" in formats:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", FutureWarning
                )  # torch.jit is deprecated, TorchScript files are not
                traced = torch.jit.trace(model, example)
            traced.save(str(tmp / "model.torchscript.pt"))
            written["torchscript"] = out / "model.torchscript.pt"
        meta = pre | {
            "embedding_dim": embedder.dim,
            "metric": embedder.metric,
            "normalized": embedder.metric == "cosine",
            "checkpoint": embedder.checkpoint,
            "checkpoint_sha256": embedder.checkpoint_sha256,
        }
        (tmp / "preprocessing.json").write_text(json.dumps(meta, indent=2))
    return written | {"preprocessing": out / "preprocessing.json"}
