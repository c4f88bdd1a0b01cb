"""Shared fixtures: offline environment, composed configs, and a runner for the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A run that takes seconds on 2 CPU cores: generated data, timm's tiny test_resnet, no progress bar.
FAST_RUN = [
    "experiment=synthetic_smoke",
    "callbacks=no_progress",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


def compose_config(overrides: list[str], tmp_path: Path, name: str = "train") -> DictConfig:
    """The real config as ``train.py`` would see it, with outputs under ``tmp_path``."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        del cfg.hydra
    return cfg


@pytest.fixture
def compose_cfg(tmp_path):
    return lambda overrides=(), name="train": compose_config(list(overrides), tmp_path, name)


def run_entry(
    script: str, args: list[str], cwd: Path = ROOT, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``train.py`` or ``evaluate.py`` in a fresh interpreter, as a user would."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
