"""Shared fixtures: offline environment, composed configs, and a runner for the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from dml.config import compose

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
    return compose(overrides, name=name, output_dir=tmp_path / "run")


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
