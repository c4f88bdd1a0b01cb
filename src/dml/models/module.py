"""DMLModule: backbone + embedding head + composite loss, with retrieval evaluation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import lightning as L
import torch
from torch import nn

from dml.errors import UserError
from dml.evaluation.backends import KNN_BACKENDS, faiss_available
from dml.evaluation.protocol import EvaluationProtocol
from dml.log import get_logger
from dml.losses import CompositeLoss
from dml.losses.distributed import (
    broadcast_object,
    gather_batch,
    gather_objects,
    rescale_local_gradients,
    world_size,
)
from dml.models import random_state, sharding
from dml.models.finite import FiniteLossCheck

log = get_logger(__name__)

PARAM_GROUPS = ("backbone", "head", "loss")


@dataclass
class EvaluationResult:
    """The embeddings of the last evaluated split, in dataset order, and how that split is scored."""

    stage: str
    embeddings: torch.Tensor
    labels: torch.Tensor
    protocol: EvaluationProtocol


class DMLModule(L.LightningModule):
    """Trains L2-normalised embeddings with a composite loss; validates and tests by retrieval.

    Args:
        backbone: image -> (B, F) features, with ``num_features``.
        head: (B, F) -> (B, d) unit-norm embeddings.
        loss: the training loss; its parameters (proxies, margin beta) form their own optimizer groups.
        optimizer: a partial optimizer (``_partial_: true``) whose ``lr`` is the base learning rate.
        scheduler: a partial lr scheduler taking the optimizer, or ``None``.
        lr_mult: learning-rate multiplier per parameter group (backbone, head, loss).
        loss_weight_decay: weight decay of the loss-owned parameters; ``None`` keeps the optimizer's.
        warmup_epochs: epochs during which the backbone is frozen and only head and loss train.
        layer_decay: layer-wise lr decay of the backbone (ViT fine-tuning, as BEiT): its last layer trains
            at the backbone's lr, each earlier layer at ``layer_decay`` times the next; biases and norms
            get no weight decay. Timm backbones only; ``None``: one backbone group.
        recall_ks: the K of Recall@K.
        knn_backend: ``auto``, ``torch`` or ``faiss``.
        nmi: compute NMI at evaluation.
        nmi_multiples: also NMI+ with k-means at these multiples of the class count (EPS uses 10 and 30).
        collapse: compute the collapse measures (coding rate, per-class coding rate, effective rank,
            intra/inter distance ratio) at evaluation.
        channels_last: backbone weights and input batches in channels_last memory format (faster
            convolutions under mixed precision on GPUs); ``auto``: on when running on a CUDA device.
        compile: ``torch.compile`` the backbone in place (state dict keys unchanged); ``auto``: on when
            running on a CUDA device.
        run_config: the resolved run config, stored in checkpoints so ``evaluate.py`` can rebuild the model.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        loss: CompositeLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        lr_mult: Mapping[str, float] | None = None,
        loss_weight_decay: float | None = None,
        warmup_epochs: int = 0,
        layer_decay: float | None = None,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
        knn_backend: str = "auto",
        nmi: bool = True,
        nmi_multiples: Sequence[int] = (),
        collapse: bool = True,
        channels_last: bool | str = "auto",
        compile: bool | str = "auto",
        run_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        for name, value in (("channels_last", channels_last), ("compile", compile)):
            if value not in (True, False, "auto"):
                raise UserError(f"model.{name}={value!r} must be true, false or auto")
        self.speed = {"channels_last": channels_last, "compile": compile}
        self._channels_last = False
        self.backbone, self.head, self.loss = backbone, head, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.lr_mult = {g: 1.0 for g in PARAM_GROUPS} | dict(lr_mult or {})
        unknown = set(self.lr_mult) - set(PARAM_GROUPS)
        if unknown:
            raise UserError(f"model.lr_mult has unknown groups {sorted(unknown)}; use {list(PARAM_GROUPS)}")
        if knn_backend not in KNN_BACKENDS:
            raise UserError(f"model.knn_backend={knn_backend!r} is not one of {', '.join(KNN_BACKENDS)}")
        # Un-normalised embeddings (head.normalize=false) are scored, and must be trained, in R^d.
        self.metric = "cosine" if getattr(head, "normalize", True) else "euclidean"
        if self.metric == "euclidean":
            normalizing = [n for n, m in loss.named_modules() if getattr(m, "normalize_embeddings", False)]
            if normalizing:
                raise UserError(
                    "head.normalize=false leaves the embeddings un-normalised, but these loss parts "
                    f"normalise them: {', '.join(f'loss.{n}' for n in normalizing)}. Set their "
                    "normalize_embeddings: false where they take it (TripletLoss, MarginLoss, ContrastiveLoss, "
                    "SemiHardNegativeMiner, EasyPositiveMiner); the others work on unit vectors only"
                )
            if knn_backend == "faiss":
                raise UserError(
                    "head.normalize=false is scored by Euclidean distance: use model.knn_backend=torch"
                )
        if knn_backend == "faiss" and not faiss_available():
            raise UserError(
                "model.knn_backend=faiss but faiss is not installed: pip install faiss-cpu (or faiss-gpu), "
                "or use model.knn_backend=torch"
            )
        self.loss_weight_decay, self.warmup_epochs = loss_weight_decay, warmup_epochs
        if layer_decay is not None:
            if not 0 < layer_decay <= 1:
                raise UserError(f"model.layer_decay={layer_decay} must be in (0, 1] (or null for none)")
            if not hasattr(backbone, "layer_groups"):
                raise UserError(
                    f"model.layer_decay is for timm backbones (ViTs); {type(backbone).__name__} has no layer "
                    "grouping: set model.layer_decay=null and use model.lr_mult.backbone"
                )
        self.layer_decay = layer_decay
        self.recall_ks, self.knn_backend, self.nmi = list(recall_ks), knn_backend, nmi
        self.nmi_multiples, self.collapse = list(nmi_multiples), collapse
        self.last_evaluation: EvaluationResult | None = None
        self.run_config = dict(run_config) if run_config is not None else None
        self._protocols: dict[str, EvaluationProtocol] = {}
        self._eval_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._finite = FiniteLossCheck()  # this optimizer step's losses
        self.test_results: dict[str, float] = {}

    # --- forward ----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, d) unit-norm embeddings."""
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def setup(self, stage: str) -> None:
        """Resolve the speed switches (``auto``: on with a CUDA device) once the device is known."""
        cuda = self.trainer.strategy.root_device.type == "cuda"
        on = {name: cuda if value == "auto" else value for name, value in self.speed.items()}
        if on["channels_last"] and not self._channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self._channels_last = True
        if on["compile"] and not getattr(self.backbone, "_compiled_by_dml", False):
            self.backbone.compile()  # in place: parameters and state dict keys stay the backbone's
            cast(Any, self.backbone)._compiled_by_dml = True
        if any(on.values()):
            log.info("speed switches: %s", ", ".join(name for name, value in on.items() if value))
        if getattr(self.loss, "shard_proxies", False):
            sharding.shard_proxies(self, self.trainer.world_size, self.global_rank)

    @property
    def in_warmup(self) -> bool:
        return self.current_epoch < self.warmup_epochs

    def on_train_epoch_start(self) -> None:
        # Lightning (2.6) no longer calls train() when fitting starts, and after each validation it
        # restores every submodule's flag directly: call it here so that the backbone's own train()
        # keeps frozen BatchNorm in eval mode (its running statistics fixed) from the first batch.
        self.train()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        if self.in_warmup and self.trainer.world_size == 1:
            with torch.no_grad():  # frozen backbone: skip its backward pass entirely
                features = self.backbone(images)
            embeddings = self.head(features)
        else:
            embeddings = self(images)
        # Under DDP the loss sees the global batch (see dml.losses.distributed).
        embeddings, labels = gather_batch(embeddings, labels)
        out = self.loss(embeddings, labels)
        self._finite.add(out)  # checked before the optimizer step, without waiting for the backward
        batch_size = labels.shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch_size)
        for name in self.loss.terms:
            self.log(f"train/loss/{name}", out[name], batch_size=batch_size)
        return out["loss"]

    def _stop_on_non_finite(self, out: dict[str, torch.Tensor]) -> None:
        terms = ", ".join(f"{name} = {value.item():.4g}" for name, value in out.items())
        folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        raise UserError(
            f"the loss is not finite at epoch {self.current_epoch}, step {self.global_step} ({terms}); "
            f"training stopped and the checkpoints written so far are kept{f' in {folder}' if folder else ''}. "
            "Lower the learning rate (optimizer.lr) or the weight of the term that diverged, or train in "
            "full precision (trainer.precision=32-true)."
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        bad = self._finite.first_non_finite()
        if bad is not None:
            self._stop_on_non_finite(bad)
        # Once per optimizer step, after the last accumulated micro-batch and before gradient clipping:
        # DDP averaged the gradients, and backbone and head saw only their rank's chunk of each global
        # batch's loss (dml.losses.distributed). Rescaling after every backward instead would multiply
        # the gradients that earlier micro-batches had already accumulated once more each time.
        rescale_local_gradients([*self.backbone.parameters(), *self.head.parameters()], world_size())
        if self.in_warmup:
            # Under DDP the backbone still runs backward (every rank must reduce the same parameters);
            # dropping its gradients keeps the optimizer from touching it, weight decay included.
            for p in self.backbone.parameters():
                p.grad = None

    # --- evaluation -------------------------------------------------------------------------------------
    def _collect(self, batch: tuple[torch.Tensor, ...]) -> None:
        images, labels, index = batch
        self._eval_outputs.append((self(images).float(), labels, index))

    def set_evaluation_protocols(self, protocols: Mapping[str, EvaluationProtocol]) -> None:
        """How the ``val`` and ``test`` splits are scored; the datamodule hands them over at its setup.

        Without them, every item queries all the others, with this module's ``recall_ks``.
        """
        self._protocols = dict(protocols)

    def protocol(self, stage: str) -> EvaluationProtocol:
        return self._protocols.get(stage) or EvaluationProtocol(recall_ks=tuple(self.recall_ks))

    def metric_names(self) -> list[str]:
        """Every metric this module logs in training, validation and test, with its current protocols."""
        options = (self.nmi, tuple(self.nmi_multiples), self.collapse)
        return [
            "train/loss",
            *(f"train/loss/{name}" for name in self.loss.terms),
            *(
                name
                for stage in ("val", "test")
                for name in self.protocol(stage).metric_names(stage, *options)
            ),
        ]

    def _evaluate(self, stage: str) -> dict[str, float]:
        embeddings, labels, index = (torch.cat(t) for t in zip(*self._eval_outputs, strict=True))
        self._eval_outputs.clear()
        if self.trainer.world_size > 1:
            # The distributed sampler pads the split with repeats; keep one copy per item.
            embeddings, labels, index = (
                cast(torch.Tensor, self.all_gather(t)).flatten(0, 1) for t in (embeddings, labels, index)
            )
            index, first = _first_occurrence(index)
            embeddings, labels = embeddings[first], labels[first]
        order = torch.argsort(index)
        embeddings, labels, index = embeddings[order], labels[order], index[order]
        protocol = self.protocol(stage)
        # Scored once, on rank 0 (k-means, kNN and the collapse measures would be the same on every rank),
        # and shared.
        metrics: dict[str, float] = {}
        failure: tuple[bool, str] | None = None
        if self.global_rank == 0:
            options = self._metric_options()
            try:
                metrics = protocol.score(stage, embeddings, labels, index, self.collapse, **options)
            except Exception as e:  # shared below: the other ranks must not wait for metrics that never come
                if self.trainer.world_size == 1:
                    raise
                failure = (isinstance(e, UserError), f"scoring the {stage} split failed on rank 0: {e}")
        if self.trainer.world_size > 1:
            metrics, failure = broadcast_object((metrics, failure))
        if failure:
            raise (UserError if failure[0] else RuntimeError)(failure[1])
        # Identical on every rank; syncing only quiets Lightning.
        self.log_dict(metrics, sync_dist=self.trainer.world_size > 1)
        # Kept for callbacks that draw the embedding space (dml.callbacks.EmbeddingPictures).
        self.last_evaluation = EvaluationResult(stage, embeddings.cpu(), labels.cpu(), protocol)
        return metrics

    def _metric_options(self) -> dict[str, Any]:
        return {
            "backend": self.knn_backend,
            "metric": self.metric,
            "nmi": self.nmi,
            "nmi_multiples": self.nmi_multiples,
        }

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        if self._eval_outputs:
            self._evaluate("val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        if self._eval_outputs:
            self.test_results = self._evaluate("test")

    # --- optimisation -----------------------------------------------------------------------------------
    def _layer_decay_groups(self, lr: float) -> list[dict]:
        """The backbone's groups under layer-wise decay, named ``backbone.<layer>``; the optimizer's weight
        decay on weights, none on biases and norms."""
        keywords = getattr(self.optimizer_factory, "keywords", {})
        out = []
        for i, group in enumerate(
            cast(Any, self.backbone).layer_groups(keywords.get("weight_decay", 0.0), self.layer_decay)
        ):
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                out.append(
                    {
                        "params": params,
                        "lr": lr * group["lr_scale"],
                        "weight_decay": group["weight_decay"],
                        "name": f"backbone.{i}",
                    }
                )
        return out

    def configure_optimizers(self) -> Any:
        base_lr = (
            self.optimizer_factory.keywords.get("lr") if hasattr(self.optimizer_factory, "keywords") else None
        )
        if base_lr is None:
            raise ValueError("the optimizer config must set lr (optimizer.lr)")
        groups = []
        if self.layer_decay is not None:
            groups += self._layer_decay_groups(base_lr * self.lr_mult["backbone"])
        for name in ("head",) if self.layer_decay is not None else ("backbone", "head"):
            params = [p for p in getattr(self, name).parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": base_lr * self.lr_mult[name], "name": name})
        groups += self.loss.param_groups(base_lr * self.lr_mult["loss"], self.loss_weight_decay)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        # Epoch schedules step on the epoch's last batch, not after it: Lightning steps "epoch"
        # schedulers after the checkpoint of that epoch is written, so a resumed run would lag by one.
        # Lightning counts a "step" schedule's frequency in batches (batch_idx + 1, checked at each
        # optimizer step), not in optimizer steps: with gradient accumulation the batches per epoch are
        # what puts the step on the epoch's last batch.
        trainer = self.attached_trainer  # None outside a Trainer (then: a plain epoch schedule)
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}
        if trainer is not None and trainer.max_epochs and trainer.max_epochs > 0:
            _ = trainer.estimated_stepping_batches  # sets up the training data: the batch count is known
            batches = trainer.num_training_batches
            if batches != float("inf"):
                scheduler |= {"interval": "step", "frequency": max(1, int(batches))}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    @property
    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this module, or ``None`` outside one (Lightning's ``trainer`` raises)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dml_config"] = self.run_config
        # Random state, so that a resumed run draws what an uninterrupted one would (augmentations,
        # random miners). The batch sampler needs none: its draw depends on (seed, epoch) only. Every
        # rank builds the checkpoint dict but only rank 0 writes it: gather each rank's own state.
        checkpoint["dml_rng"] = gather_objects(random_state.capture(self.loss))
        sharding.whole_bank_into(self, checkpoint)  # the whole bank: a checkpoint loads on any process count

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sharding.loaded_from(self, checkpoint)  # read mapped: this rank's slice of the bank, copied
        states = checkpoint.get("dml_rng")
        if not states:
            return
        if isinstance(states, dict):  # written before states were kept per rank
            states = [states]
        trainer = self.attached_trainer
        rank, world = (self.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(states) != world:
            log.warning(
                "the checkpoint holds the random state of %d process(es) and the run resumes on %d: "
                "process %d takes that of process %d, so random draws differ from an uninterrupted run",
                len(states),
                world,
                rank,
                rank % len(states),
            )
        random_state.restore(states[rank % len(states)], self.loss)


def _first_occurrence(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of ``index`` and the position of each one's first occurrence."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full_like(unique, index.numel()).scatter_reduce(0, inverse, positions, reduce="amin")
    return unique, first
