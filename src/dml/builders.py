"""Builders: a run config (the Hydra config train.py composes, or one stored in a checkpoint) into the
datamodule, the module and the trainer it describes. Library code (the embedder, the study, notebooks)
builds through here, never through the command-line layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dml.checkpoints import AtomicCheckpointIO
from dml.config import BUILT_GROUPS, check_types
from dml.errors import UserError
from dml.log import get_logger
from dml.models import DMLModule
from dml.models.backbones import input_channels

log = get_logger(__name__)


def build_module(cfg: DictConfig) -> DMLModule:
    """The DMLModule a run config describes, with the resolved config attached for checkpoints."""
    backbone = instantiate(cfg.backbone)
    head = instantiate(cfg.head)(in_dim=backbone.num_features)
    loss = instantiate(cfg.loss)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return DMLModule(
        backbone=backbone,
        head=head,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        recall_ks=cfg.dataset.recall_ks,
        run_config=cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)),
        **cfg.model,
    )


def build_data_and_module(
    cfg: DictConfig, data_state: dict[str, Any] | None = None
) -> tuple[L.LightningDataModule, DMLModule]:
    """The datamodule and module of a run config; image datasets take the backbone's normalisation.
    ``data_state``: a checkpoint's datamodule state (the split of a user's data), applied before the data
    are read. A dataset whose ``num_train_classes`` is null (a user's data) is read first, and the count
    written into ``cfg`` (the loss's proxies are sized by it, and checkpoints keep it).

    Raises:
        UserError: a value has the wrong type, or the dataset's images have another number of channels
            than the backbone takes.
    """
    check_types(cfg, ["dataset"])
    datamodule = instantiate(cfg.dataset)
    if data_state:
        datamodule.load_state_dict(data_state)
    if "num_train_classes" in cfg.dataset and cfg.dataset.num_train_classes is None:
        count = datamodule.training_classes()
        with open_dict(cfg):
            cfg.dataset.num_train_classes = count
        datamodule.num_train_classes = count
        log.info("%s: %d training classes", datamodule.name, count)
    check_types(cfg, [group for group in BUILT_GROUPS if group not in ("trainer", "dataset")])
    module = build_module(cfg)
    check_channels(datamodule, module.backbone)
    data_config = getattr(module.backbone, "data_config", {})
    if hasattr(datamodule, "use_backbone_config"):
        datamodule.use_backbone_config(data_config)
        size = data_config.get("input_size", (0, 0, 0))[-1]
        if getattr(module.backbone, "is_token_model", False) and datamodule.image_size != size:
            raise UserError(
                f"dataset.image_size={datamodule.image_size} but the ViT backbone takes {size} px: set "
                f"backbone.img_size={datamodule.image_size} (position embeddings resized) or "
                f"dataset.image_size={size}"
            )
    elif data_config.get("bgr_255"):
        log.warning(
            "backbone %s expects BGR 0-255 input, but dataset %s normalises its own way: its pretrained "
            "weights will see other inputs than they were trained on",
            type(module.backbone).__name__,
            getattr(datamodule, "name", "?"),
        )
    return datamodule, module


def check_channels(datamodule: L.LightningDataModule, backbone: torch.nn.Module) -> None:
    given, taken = getattr(datamodule, "input_channels", None), input_channels(backbone)
    if given is None or taken is None or given == taken:
        return
    name = getattr(datamodule, "name", "the dataset")
    cure = (
        f"set dataset.channels={taken}"
        if taken in getattr(datamodule, "channel_choices", ())
        else f"use a model trained with backbone.in_chans={given} for it"
    )
    raise UserError(
        f"dataset {name} gives {given}-channel images and the backbone takes {taken}-channel ones: {cure}"
    )


def fast_by_default(dataset: DictConfig) -> bool:
    """Whether the dataset a config describes takes the fast input path on a GPU with ``pipeline=auto``
    (image files, not in-memory data)."""
    target = dataset.get("_target_")
    return bool(target and getattr(get_object(target), "fast_by_default", False))


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """The objects of a config group of several (``callbacks``, ``logger``), leaving out disabled ones."""
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def build_trainer(
    cfg: DictConfig, callbacks: Sequence[L.Callback] = (), loggers: Sequence[Any] | None = None, **kwargs: Any
) -> L.Trainer:
    """The trainer of ``cfg.trainer`` with the config's callbacks and loggers (or ``loggers``) and
    ``callbacks`` added; checkpoints are written atomically. ``kwargs`` override trainer settings."""
    callbacks = [*instantiate_all(cfg.get("callbacks")), *callbacks]
    loggers = instantiate_all(cfg.get("logger")) if loggers is None else list(loggers)
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], **kwargs
    )
