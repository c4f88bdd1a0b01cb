"""Shared fixtures: offline environment, composed configs, and a runner for the entry points."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    script: str, args: list[str], cwd: Path = ROOT, timeout: int = 600, **popen: Any
) -> subprocess.CompletedProcess:
    """Run ``train.py`` or ``evaluate.py`` in a fresh interpreter, as a user would."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1") | popen.pop(
        "env", {}
    )
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The last checkpoint of a short synthetic run (seed 1), trained once per test session."""
    from dml.tasks import train

    folder = tmp_path_factory.mktemp("run")
    train(compose_config([*FAST_RUN, "seed=1"], folder))
    return folder / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def embedder(checkpoint):
    from dml.inference import Embedder

    return Embedder.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="session")
def test_split(embedder):
    """The synthetic run's test split, embedded (180 x 64)."""
    return embedder.embed_split("test", progress=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` made read-only for this process, as a shared dataset copy or a full quota would be: a
    read-only bind mount when running as root (root ignores file modes), file modes otherwise."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make {path} read-only here (mount: {mounted.stderr.decode().strip()})")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode:
            pytest.skip(f"cannot remount {path} read-only here")
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)
