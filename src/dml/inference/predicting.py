"""Embedding into a folder of shards (:mod:`dml.inference.shards`) through Lightning's predict loop: one
process or several under DDP, each writing whole shards of its own, and a stopped run goes on from the
shards it finished.

Shard ``i`` covers the inputs ``[i * shard_size, (i + 1) * shard_size)`` whichever process embeds it; the
shards still to write go to the processes in turn, each shard one dataloader of its own, so that a batch
never straddles two shards. A process writes a shard when its last batch is embedded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from dml.errors import UserError
from dml.inference.embeddings import Embeddings
from dml.inference.shards import Manifest, finish_folder, names_sha256, start_folder, write_shard
from dml.log import get_logger

if TYPE_CHECKING:
    from dml.inference.embedder import Embedder

log = get_logger(__name__)


@dataclass
class Inputs:
    """What a run embeds, in order: image files, or positions of a split of the checkpoint's dataset."""

    names: list[str]  # one per input: the file's path, or <dataset>:<split>/<position>
    files: list[Path] | None = None
    split: Any = None  # the split's dataset, when not files
    positions: list[int] = field(default_factory=list)  # the split's positions, when not files


class _Step(L.LightningModule):
    """The model's forward pass for Lightning's predict loop, at the checkpoint's precision."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.model = embedder.module
        self.autocast, self.dim = embedder.autocast, embedder.dim
        self.data = embedder.datamodule  # decodes the fast path's batches where the model runs

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        if batch is None:  # an idle process's one batch
            return None
        if isinstance(batch[0], list):  # image files: (positions in the shard, images or None, unreadable)
            local, images, bad = batch
            labels = None
        else:  # a split's loader: (images, labels, positions in the shard's subset)
            images, labels, index = batch
            local, bad = index.tolist(), []
        vectors = torch.empty(0, self.dim)
        if images is not None:
            images = self.data.decode(images, self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                vectors = self.model(images.to(self.device)).float().cpu()
        return {"local": list(local), "vectors": vectors, "labels": labels, "bad": bad}


class _Shards(L.LightningDataModule):
    """This process's shards still to write, one dataloader each; rank 0 makes or checks the folder and
    tells the others which shards are done (or why it cannot go on)."""

    def __init__(self, embedder: Embedder, inputs: Inputs, folder: Path, manifest: Manifest, **options: Any):
        super().__init__()
        self.embedder, self.inputs, self.folder, self.manifest = embedder, inputs, folder, manifest
        self.options = options
        self.mine: list[int] = []

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        assert trainer is not None
        answer: tuple[set[int] | None, str, str] = (None, "", "")
        if trainer.is_global_zero:
            try:
                started = start_folder(
                    self.folder, self.manifest, self.options["resume"], self.options["overwrite"]
                )
                answer = (started, "", self.manifest.inputs_sha256)
            except Exception as e:  # noqa: BLE001 - every process must hear of it, or the others wait
                answer = (None, str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}", "")
        done, error, inputs = trainer.strategy.broadcast(answer)
        if done is None:
            raise UserError(error)
        same = trainer.strategy.reduce_boolean_decision(inputs == self.manifest.inputs_sha256, all=True)
        if not same:  # each process lists the images itself: the catalogue changed between two listings
            raise UserError(
                f"the processes found different images for images= (a folder that changed while they listed "
                f"it?): the shards of {self.folder} would not match; run again with the same command and "
                "resume=true once the folder is still"
            )
        todo = [i for i in range(self.manifest.shards) if i not in done]
        self.mine = todo[trainer.global_rank :: trainer.world_size]
        if trainer.is_global_zero and done:
            log.info(
                "%d of %d shards were written before: embedding the other %d",
                len(done),
                self.manifest.shards,
                len(todo),
            )

    def predict_dataloader(self) -> list[torch.utils.data.DataLoader]:
        if not self.mine:  # more processes than shards to write: Lightning wants a batch from each
            return [torch.utils.data.DataLoader(cast(Any, [0]), collate_fn=_nothing)]
        return [self._loader(i) for i in self.mine]

    def _loader(self, i: int) -> torch.utils.data.DataLoader:
        from dml.inference.embedder import _collate, _Files

        covered = self.manifest.shard_range(i)
        batch_size = self.options["batch_size"]
        if self.inputs.files is not None:
            return torch.utils.data.DataLoader(
                _Files([self.inputs.files[p] for p in covered], self.embedder.file_transform()),
                batch_size=batch_size,
                num_workers=self.options["num_workers"],
                collate_fn=_collate,
            )
        subset = _Positions(self.inputs.split, [self.inputs.positions[p] for p in covered])
        return self.embedder.datamodule.eval_loader(subset, batch_size)


class _Positions(torch.utils.data.Dataset):
    """Some positions of a split; each item's third field is its place among them."""

    def __init__(self, data: Any, positions: Sequence[int]):
        self.data, self.positions = data, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        image, label, _ = self.data[self.positions[i]]
        return image, label, i


def _nothing(items: list[Any]) -> None:
    return None


class _Writer(BasePredictionWriter):
    """Collects each shard's batches and writes the shard when its last one is in."""

    def __init__(self, shards: _Shards):
        super().__init__(write_interval="batch")
        self.shards = shards
        self.parts: dict[int, list[dict[str, Any]]] = {}
        self.finished: Manifest | None = None

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if prediction is None:
            return
        parts = self.parts.setdefault(dataloader_idx, [])
        parts.append(prediction)
        shard = self.shards.mine[dataloader_idx]
        covered = self.shards.manifest.shard_range(shard)
        if sum(len(p["local"]) + len(p["bad"]) for p in parts) == len(covered):
            part = self._embeddings(covered, self.parts.pop(dataloader_idx))
            write_shard(self.shards.folder, shard, part, self.shards.manifest.inputs_sha256)

    def _embeddings(self, covered: range, parts: list[dict[str, Any]]) -> Embeddings:
        names, m = self.shards.inputs.names, self.shards.manifest
        local = [i for p in parts for i in p["local"]]
        skipped = [{"path": names[covered[i]], "error": error} for p in parts for i, error in p["bad"]]
        for s in skipped:
            log.warning("skipped %s: %s", s["path"], s["error"])
        labels = [p["labels"] for p in parts if p["labels"] is not None]
        return Embeddings(
            torch.cat([p["vectors"] for p in parts]),
            [names[covered[i]] for i in local],
            torch.cat(labels).long() if labels else torch.full((len(local),), -1, dtype=torch.long),
            m.checkpoint,
            m.checkpoint_sha256,
            m.metric,
            skipped,
        )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()  # every process's shards written
        if trainer.is_global_zero:
            self.finished = finish_folder(self.shards.folder, self.shards.manifest)


def embed_to_shards(
    embedder: Embedder,
    inputs: Inputs,
    folder: Path,
    shard_size: int,
    batch_size: int = 64,
    num_workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    devices: int = 1,
    num_nodes: int = 1,
    callbacks: Sequence[L.Callback] = (),
    progress: bool = True,
) -> Manifest | None:
    """Embed ``inputs`` into ``folder`` as shards of ``shard_size`` (see the module docstring), on
    ``devices`` processes of the embedder's device type a node (several: DDP). Returns the finished
    folder's manifest on the first process, None on the others."""
    manifest = Manifest(
        embedder.checkpoint,
        embedder.checkpoint_sha256,
        embedder.metric,
        embedder.dim,
        len(inputs.names),
        names_sha256(inputs.names),
        shard_size,
    )
    shards = _Shards(
        embedder,
        inputs,
        folder,
        manifest,
        batch_size=batch_size,
        num_workers=num_workers,
        resume=resume,
        overwrite=overwrite,
    )
    writer = _Writer(shards)
    several = devices > 1 or num_nodes > 1
    device = embedder.device
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=devices if several or device.type == "cpu" else [device.index or 0],
        num_nodes=num_nodes,
        strategy="ddp" if several else "auto",
        precision="32-true",  # the step autocasts as the checkpoint trained
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,  # each process has its own shards
        callbacks=[writer, *callbacks],
    )
    trainer.predict(_Step(embedder), datamodule=shards, return_predictions=False)
    return writer.finished
