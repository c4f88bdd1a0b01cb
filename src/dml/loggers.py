"""Experiment loggers: Weights & Biases that falls back to offline mode without credentials."""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger

from dml.log import get_logger

log = get_logger(__name__)


def wandb_credentials_found() -> bool:
    """True when an API key is in the environment or in ~/.netrc (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def sweep_name() -> str | None:
    """The sweep folder's name when running as a Hydra multirun job, else None."""
    try:
        hydra = HydraConfig.get()
    except ValueError:  # not under @hydra.main
        return None
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra.sweep.dir).name


def wandb_logger(
    project: str,
    save_dir: str,
    group: str | None = None,
    tags: Sequence[str] = (),
    name: str | None = None,
    offline: bool | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A ``WandbLogger``; ``offline=None`` means offline exactly when no credentials are found.

    ``WANDB_MODE=offline`` in the environment also forces offline mode. In a Hydra sweep every job
    logs to the group ``<group>/<sweep folder>`` as its own run ``job<N>``.
    """
    sweep = sweep_name()
    if sweep is not None:  # one wandb group per sweep, one run per job
        group = f"{group}/{sweep}" if group else sweep
        name = name or f"job{HydraConfig.get().job.num}"
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_found()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if offline:
        log.info(
            "W&B runs offline (no credentials, or WANDB_MODE=offline). Upload later with: wandb sync %s/wandb/offline-run-*",
            save_dir,
        )
    return WandbLogger(
        project=project, save_dir=save_dir, group=group, tags=list(tags), name=name, offline=offline, **kwargs
    )
