"""Checkpoints written by dml's train.py: read and checked, rebuilt into their run config, and written
atomically (each one beside its target, then renamed into place)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from dml.errors import UserError
from dml.io import atomic_path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of a checkpoint written by dml's train.py.

    Raises:
        UserError: the file is missing, unreadable or truncated, or was not written by dml.
    """
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass ckpt_path=<path to a .ckpt written by train.py>")
    try:
        # mapped, not read: checking a resume needs the shapes, not the weights (a large proxy bank)
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # any load failure means the file is not a usable checkpoint
        raise UserError(
            f"{path} cannot be read as a PyTorch checkpoint, it may be truncated ({type(e).__name__}: {e}); "
            "use another checkpoint of the run (its checkpoints/ folder)"
        ) from e
    if not isinstance(payload, dict) or not payload.get("dml_config") or "state_dict" not in payload:
        raise UserError(
            f"{path} is not a checkpoint written by dml's train.py (it has no dml_config); "
            "use a checkpoint from a dml run's checkpoints/ folder"
        )
    return payload


def check_same_model(path: Path, state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise a UserError naming the first differences when ``state_dict`` does not fit ``model``."""
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in own]
    problems += [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} now"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if problems:
        raise UserError(
            f"checkpoint {path} was written by a different model than the one configured now ("
            + "; ".join(problems[:3])
            + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            + "); use the checkpoint's own settings (its run's config.yaml), or drop ckpt_path"
        )


class Loaded(NamedTuple):
    """A checkpoint's run config, its model weights, and its datamodule's state (the split of a user's
    data; empty for the built-in benchmarks)."""

    config: DictConfig
    state_dict: dict[str, Any]
    data_state: dict[str, Any]


def data_state(payload: Mapping[str, Any], run_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The datamodule's ``state_dict`` that Lightning saved in a checkpoint (under the class's name)."""
    target = str(run_cfg.get("dataset", {}).get("_target_", ""))
    state = payload.get(target.rsplit(".", 1)[-1]) if target else None
    return dict(state) if isinstance(state, Mapping) else {}


def load_checkpoint(ckpt_path: Path) -> Loaded:
    """The run config stored in a checkpoint written by train.py, its state dict and its datamodule's state.

    The backbone is rebuilt without its pretrained weights: the state dict holds every weight, and
    evaluating must not need the network or the weights file that training started from."""
    payload = read_checkpoint(ckpt_path)
    run_cfg = OmegaConf.create(payload["dml_config"])
    without_pretrained_weights(run_cfg)
    dataset = run_cfg.get("dataset", {})
    if "resize_size" in dataset and "interpolation" not in dataset:
        with open_dict(run_cfg):  # written before dataset.interpolation existed: trained bilinear
            run_cfg.dataset.interpolation = "bilinear"
    return Loaded(run_cfg, payload["state_dict"], data_state(payload, payload["dml_config"]))


def without_pretrained_weights(run_cfg: DictConfig) -> None:
    """Rebuild a checkpoint's backbone without loading pretrained weights (the state dict has them all)."""
    for key, value in (("pretrained", False), ("pretrained_file", None)):
        if key in run_cfg.get("backbone", {}):
            run_cfg.backbone[key] = value


def _on_the_cpu(storage: Any, location: str) -> Any:
    """Lightning's default ``map_location``: each tensor stays where loading puts it (the CPU)."""
    return storage


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a hidden file beside its target, flushes it to disk and renames it over
    the target: a full disk or a kill leaves the previous checkpoint as it was.

    Reads a local checkpoint mapped, not copied: a process resuming a run whose proxies are sharded
    keeps its own slice of the bank and of its optimizer state, and the rest stays in the page cache,
    shared by the processes (a whole bank of 10^7 classes and its Adam moments are 60 GB). Since files are
    replaced by renaming, a checkpoint written later leaves a mapped one as it was.
    """

    def load_checkpoint(
        self, path: Any, map_location: Any = _on_the_cpu, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path) or not Path(path).is_file():
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        kept = f"the previous {path.name} is kept as it was" if path.exists() else f"{path} was not written"
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except (UserError, RuntimeError) as e:  # torch.save turns a failed write into a RuntimeError
            cause = next((x for x in (e, e.__context__, e.__cause__) if isinstance(x, OSError)), None)
            if cause is None:
                raise
            raise UserError(
                f"could not write checkpoint {path} ({cause.strerror or cause}); {kept}. Free disk space in "
                f"{path.parent} (or choose another run folder)"
            ) from e
