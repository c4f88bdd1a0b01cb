"""The project's Hydra config, composed outside the command line (notebooks, scripts, tests)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict


def conf_dir() -> Path:
    """The ``conf/`` folder: ``$DML_CONF``, else the one beside ``src/`` in this checkout."""
    if os.environ.get("DML_CONF"):
        return Path(os.environ["DML_CONF"])
    path = Path(__file__).resolve().parents[2] / "conf"
    if not path.is_dir():
        raise FileNotFoundError(f"no conf/ folder at {path}; set DML_CONF to the project's conf/ folder")
    return path


def compose(
    overrides: Sequence[str] = (), name: str = "train", output_dir: str | Path | None = None
) -> DictConfig:
    """The config ``train.py`` would build from ``overrides``, with its outputs in ``output_dir``.

    Args:
        overrides: Hydra overrides, as on the command line.
        name: ``train``, ``evaluate`` or ``prepare``.
        output_dir: where the run writes (checkpoints, logs, pictures); a new temporary folder if None.
            Data stay in ``paths.data_dir`` as usual.
    """
    output = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="dml-run-"))
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} in paths
    with open_dict(cfg):
        cfg.paths.output_dir = str(output)
        del cfg.hydra
    return cfg


def loss_names() -> list[str]:
    """Every loss a run can select (``loss=<name>``): the files of ``conf/loss/``."""
    return sorted(p.stem for p in (conf_dir() / "loss").glob("*.yaml"))


def build_loss(name: str, num_classes: int, embedding_size: int) -> torch.nn.Module:
    """The CompositeLoss that ``loss=<name>`` trains with, for ``num_classes`` training classes and
    ``embedding_size``-d embeddings (proxies initialised from torch's global generator)."""
    cfg = compose(
        [f"loss={name}", f"dataset.num_train_classes={num_classes}", f"head.out_dim={embedding_size}"],
        output_dir=tempfile.gettempdir(),
    )
    return instantiate(cfg.loss)
