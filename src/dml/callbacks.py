"""Lightning callbacks of the package."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from dml.errors import UserError
from dml.evaluation.collapse import singular_values
from dml.evaluation.pictures import embedding_map, spectrum_plot, split_retrievals
from dml.evaluation.protocol import EvaluationProtocol
from dml.log import get_logger

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

    from dml.models import DMLModule

log = get_logger(__name__)


class EmbeddingPictures(L.Callback):
    """Draws the evaluated embedding space after validation or test, into ``dirpath`` and wandb.

    Pictures: ``<stage>_embedding_map.png`` (2-D map coloured by class), ``<stage>_spectrum.png``
    (singular values), ``<stage>_retrievals.png`` (queries with their nearest items, wrong ones red).
    Validation pictures are redrawn at each validation, so the files show the latest epoch.

    Args:
        dirpath: output folder.
        stages: any of ``val`` and ``test``.
        num_queries, top_k: size of the retrieval grid.
        max_points, method: points and projection (``tsne`` or ``pca``) of the 2-D map.
    """

    def __init__(
        self,
        dirpath: str,
        stages: Sequence[str] = ("test",),
        num_queries: int = 6,
        top_k: int = 5,
        max_points: int = 1000,
        method: str = "tsne",
    ):
        self.dirpath, self.stages = Path(dirpath), set(stages)
        self.num_queries, self.top_k, self.max_points, self.method = num_queries, top_k, max_points, method
        self.written: list[Path] = []

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._draw(trainer, module, "val")

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._draw(trainer, module, "test")

    def _draw(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        result = getattr(module, "last_evaluation", None)
        if stage not in self.stages or result is None or result.stage != stage or not trainer.is_global_zero:
            return
        if trainer.sanity_checking:
            return
        x, y, protocol = result.embeddings, result.labels, result.protocol
        paths = [
            embedding_map(x, y, self.dirpath / f"{stage}_embedding_map.png", self.max_points, self.method),
            spectrum_plot(singular_values(x), self.dirpath / f"{stage}_spectrum.png"),
        ]
        if protocol.raw_image is not None and len(y) > 1:
            metric = getattr(module, "metric", "cosine")
            paths.append(self._grid(x, y, protocol, self.dirpath / f"{stage}_retrievals.png", metric))
        self.written = paths
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                for p in paths:
                    cast("WandbLogger", logger).log_image(
                        key=f"{stage}/{p.stem.removeprefix(stage + '_')}", images=[str(p)]
                    )
        log.info("pictures of the %s embeddings: %s", stage, self.dirpath)

    def _grid(
        self, x: torch.Tensor, y: torch.Tensor, protocol: EvaluationProtocol, path: Path, metric: str
    ) -> Path:
        roles = protocol.roles
        assert protocol.raw_image is not None  # _draw only asks for a grid with images to show
        queries = torch.arange(len(y)) if roles is None else torch.nonzero(roles == 0).flatten()
        # every query searched; the failures drawn first, worst first, then successes at random
        return split_retrievals(
            x, y, roles, protocol.raw_image, queries, path, self.top_k, metric, shown=self.num_queries
        )


class MonitoredMetricsCheck(L.Callback):
    """Checks, once the data are set up and before the first batch, that every metric the config
    monitors (``monitor.metric``, ``optimized_metric``, callbacks' ``monitor``) is one the module logs."""

    def __init__(self, keys: dict[str, str | None]):
        self.keys = keys

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        names = cast("DMLModule", module).metric_names()
        keys = dict(self.keys)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # Lightning sets it at run time
            if getattr(callback, "monitor", None) and callback.monitor not in keys.values():
                keys[f"callbacks ({type(callback).__name__}) monitor"] = callback.monitor
        for key, metric in keys.items():
            if metric and metric not in names:
                raise UserError(
                    f"{key}={metric} is not a metric this run logs; choose one of: {', '.join(names)}"
                )


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading the logged metrics only every ``trainer.log_every_n_steps``
    training batches and at each epoch's end. Each read copies them to the host, which waits for every
    kernel queued on the device: read after every batch, it would hold the next batch's decoding until
    the step is done (the fast path overlaps the two)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._batches = 0
        self._shown: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._batches += 1
        super().on_train_batch_end(trainer, *args, **kwargs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._shown = None
        super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        every = max(1, getattr(trainer, "log_every_n_steps", 50))  # set by the trainer's logger connector
        if self._shown is None or not trainer.training or self._batches % every == 0:
            self._shown = super().get_metrics(trainer, pl_module)
        return self._shown
