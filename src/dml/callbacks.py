"""Lightning callbacks of the package."""

from __future__ import annotations

import json
import time
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
from dml.io import write_atomic
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


class TrainingRecord(L.Callback):
    """Writes ``path`` (JSON): how a run converged and what each loss term pushed.

    - ``epochs``: after each validation, the epoch, the step, the training time so far in seconds
      (wall-clock time of the training epochs, validation and checkpoint writing left out) and ``metric``;
    - ``gradients``: every ``gradient_every`` steps (the first and the last step too), each loss term's
      value and the norms of the gradient its weighted value sends to the batch embeddings and to the
      loss's own parameters (the class proxies). They are taken from the step's own graph when the term
      is computed (a backward pass through the loss only, not the network), so miners draw nothing more.

    Kept in checkpoints: a resumed run goes on with the record it had. Under DDP the gradients are rank
    0's: its share of the loss and, with sharded proxies, its shard.
    """

    def __init__(self, path: str | Path, metric: str = "val/recall@1", gradient_every: int = 10):
        if gradient_every < 0:
            raise ValueError(f"gradient_every must be >= 0 (0: no gradients), got {gradient_every}")
        self.path, self.metric, self.gradient_every = Path(path), metric, gradient_every
        self.epochs: list[dict[str, float]] = []
        self.gradients: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._since: float | None = None
        self._measure, self.step = False, 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "gradients": self.gradients, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs, self.gradients = list(state_dict["epochs"]), list(state_dict["gradients"])
        self.seconds = float(state_dict["seconds"])

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.gradient_every:
            loss = cast("DMLModule", module).loss
            for name, term in loss.terms.items():
                self._hooks.append(term.register_forward_hook(self._hook(name, loss)))

    def _hook(self, name: str, loss: Any) -> Any:
        def measure(term: torch.nn.Module, args: tuple[Any, ...], value: torch.Tensor) -> None:
            if not (self._measure and torch.is_grad_enabled() and value.requires_grad):
                return
            embeddings = args[0]
            inputs = [embeddings] if embeddings.requires_grad else []
            parameters = [p for p in loss.parameters() if p.requires_grad]
            grads = torch.autograd.grad(
                loss.weights[name] * value.float(),
                [*inputs, *parameters],
                retain_graph=True,
                allow_unused=True,
            )
            norms = [0.0 if g is None else g.float().norm().item() for g in grads]
            to_embeddings = norms[0] if inputs else 0.0
            self.gradients.append(
                {
                    "step": self.step,
                    "term": name,
                    "weight": loss.weights[name],
                    "value": value.item(),
                    "embeddings": to_embeddings,
                    "proxies": sum(n**2 for n in norms[len(inputs) :]) ** 0.5,
                }
            )

        return measure

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self._since is None:  # training goes on after a validation within the epoch
            self._since = time.perf_counter()
        self.step = trainer.global_step
        last = trainer.estimated_stepping_batches - 1
        self._measure = bool(self.gradient_every) and (
            self.step % self.gradient_every == 0 or self.step == last
        )

    def on_train_batch_end(self, *args: Any) -> None:
        self._measure = False

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def _stop_clock(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._stop_clock()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._stop_clock()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step, "seconds": self.seconds}
        self.epochs.append(row | {self.metric: value})
        self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._write(trainer)
        self.teardown(trainer, module, "fit")

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            record = {"metric": self.metric, "epochs": self.epochs, "gradients": self.gradients}
            write_atomic(self.path, json.dumps(record, indent=1) + "\n")
