"""A training run's folder and checkpoints: nothing finished is overwritten, nothing is left half-written.

- :func:`claim_run_dir` refuses a folder that already holds a run unless the command resumes it
  (``ckpt_path=last``) or asks to replace it (``overwrite=true``).
- :func:`check_resume` checks a checkpoint's settings before a run resumes from it (reading and writing
  checkpoints is :mod:`dml.checkpoints`).
- :func:`resume_command` is the exact command that continues a stopped run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dml.errors import UserError
from dml.io import unwritable
from dml.log import get_logger

log = get_logger(__name__)

# What a training run writes into its folder; a run that got this far is kept unless asked.
FINISHED_OUTPUTS = ("checkpoints", "test_metrics.json")
# Everything else a run (and Hydra) writes there, moved aside with them by overwrite=true.
OTHER_OUTPUTS = ("config.yaml", "csv", "pictures", "wandb", ".hydra", "train.log", "FAILED")
REPLACED = ".replaced"  # overwrite=true keeps the earlier run here until the new one finishes
# Settings a resumed run takes from the checkpoint (optimizer and scheduler state), not from the config.
RESTORED_FROM_CHECKPOINT = ("optimizer", "scheduler", "model.lr_mult", "model.loss_weight_decay")
# Settings a run may change when it resumes without a word (where data live, how fast they load).
FREE_ON_RESUME = ("dataset.root", "dataset.num_workers", "dataset.pin_memory", "dataset.persistent_workers")
# Options of train.py that describe this invocation rather than the run.
INVOCATION_KEYS = ("ckpt_path", "overwrite", "hydra.run.dir", "hydra.mode")


class RunStopped(Exception):
    """A signal stopped training before the end; ``exit_code`` is the process's exit status and the
    message says how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def is_launching_process() -> bool:
    """True in the process a user started (global rank 0); False in the processes DDP, SLURM or
    torchrun start beside it."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in keys)


def check_writable(folder: Path, option: str) -> None:
    """Create ``folder`` if needed and check that files can be written in it.

    Raises:
        UserError: it is a file, or it cannot be created or written; the message names ``option``.
    """
    problem = unwritable(folder, create=True)
    if problem:
        raise UserError(
            f"cannot write the run folder {folder} ({problem}); choose a writable one with {option} "
            "(or paths.log_dir=<folder> for every run)"
        )


def claim_run_dir(output_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """Make ``output_dir`` ready for a run, refusing one that holds a run that got somewhere (a
    checkpoint or test metrics) unless the command resumes it or passes ``overwrite=true``.

    With ``overwrite=true`` the earlier run's files move to ``<run>/.replaced/``, removed once the new
    run finishes (:func:`release_replaced`): a new run that fails leaves the earlier one recoverable.

    Raises:
        UserError: the folder cannot be written, or it holds another run and the command neither
            resumes it nor passes ``overwrite=true``.
    """
    if not is_launching_process():
        return  # the launching process checked the folder; the others must not race it
    check_writable(output_dir, "hydra.run.dir=<folder>")
    replaced = output_dir / REPLACED
    if (
        ckpt_path
        and ckpt_path != "last"
        and Path(ckpt_path).expanduser().resolve().is_relative_to(replaced.resolve())
    ):
        raise UserError(
            f"ckpt_path={ckpt_path} is in {replaced}, the finished run an overwrite=true run set aside; nothing was "
            f"changed. To go on from it, take it back first: {restore_hint(output_dir)}"
        )
    if _resumes_inside(output_dir, ckpt_path):
        return
    if replaced.is_dir() and not overwrite:
        raise UserError(
            f"the run folder {output_dir} holds a finished run, set aside in {replaced} by an overwrite=true "
            "run that did not finish; nothing was changed. Replace it with overwrite=true, train into a new "
            f"folder (drop hydra.run.dir), or take it back: {restore_hint(output_dir)}"
        )
    finished = [name for name in FINISHED_OUTPUTS if (output_dir / name).exists()]
    if finished and not overwrite:
        raise UserError(
            f"the run folder {output_dir} already holds a run ({', '.join(finished)}); nothing was changed. "
            "Resume it with ckpt_path=last, train into a new folder (drop hydra.run.dir), or replace it with "
            "overwrite=true"
        )
    found = [name for name in (*FINISHED_OUTPUTS, *OTHER_OUTPUTS) if (output_dir / name).exists()]
    if not found:
        return
    if finished and not replaced.exists():
        replaced.mkdir()
        for name in found:
            (output_dir / name).replace(replaced / name)
        log.warning("overwrite=true: the earlier run waits in %s until this one finishes", replaced)
        return
    # What is left is a run that never wrote a checkpoint, or a replacement that failed (the run it
    # replaced is still in .replaced): start over.
    for name in found:
        path = output_dir / name
        if name not in (".hydra", "train.log"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def restore_hint(output_dir: Path) -> str:
    """How to take back the run that ``overwrite=true`` set aside in ``<output_dir>/.replaced``."""
    return (
        f"delete everything else in {output_dir}, then move what {output_dir / REPLACED} holds (hidden files "
        f"too) back into {output_dir}"
    )


def replaced_note(output_dir: Path) -> str | None:
    """What a failed or stopped run says when it was replacing a finished run (``overwrite=true``): where
    that run is kept, and how to take it back; ``None`` when it replaced nothing."""
    replaced = output_dir / REPLACED
    if not replaced.is_dir():
        return None
    return (
        f"The finished run this one was to replace is kept as it was in {replaced}: it is removed only when a "
        "run in this folder finishes with overwrite=true, or when this one is resumed (ckpt_path=last) and "
        f"finishes. To take it back, {restore_hint(output_dir)}."
    )


def release_replaced(output_dir: Path) -> None:
    """Remove the run that ``overwrite=true`` replaced, now that the new one has finished."""
    replaced = output_dir / REPLACED
    if replaced.is_dir() and is_launching_process():
        shutil.rmtree(replaced)
        log.info("overwrite=true: removed the replaced run (%s)", replaced)


def _resumes_inside(output_dir: Path, ckpt_path: str | None) -> bool:
    if not ckpt_path:
        return False
    if ckpt_path == "last":
        return True
    return Path(ckpt_path).expanduser().resolve().is_relative_to(output_dir.resolve())


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> Path | None:
    """The checkpoint file a run resumes from (``last`` is the run folder's ``checkpoints/last.ckpt``)."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise UserError(
                f"ckpt_path=last: {path} does not exist, so there is nothing to resume in {output_dir}. "
                "Resume a run in its own folder (hydra.run.dir=<run dir> ckpt_path=last), give a checkpoint "
                "file (ckpt_path=<file>.ckpt), or drop ckpt_path to train from scratch"
            )
        return path
    return Path(ckpt_path).expanduser()


def check_resume(path: Path, stored: Mapping[str, Any], cfg: DictConfig) -> None:
    """Refuse to resume with settings the checkpoint's restored state would silently override, and
    log the other settings that differ from the checkpoint's run (they take effect)."""
    current = OmegaConf.to_container(cfg, resolve=True)
    ignored: list[str] = []
    changed: list[str] = []
    for key in sorted(_leaf_keys(stored) | _leaf_keys(current)):
        if key.split(".")[0] in ("paths", "hydra", "trainer", "callbacks", "logger", "tags", "run_group"):
            continue
        if key in INVOCATION_KEYS or key.startswith(FREE_ON_RESUME):
            continue
        old, new = _get(stored, key), _get(current, key)
        if old != new:
            line = f"{key}: {old!r} in the checkpoint, {new!r} now"
            (ignored if key.startswith(RESTORED_FROM_CHECKPOINT) else changed).append(line)
    if ignored:
        follows = (
            "\n(scheduler.T_max follows trainer.max_epochs: a cosine schedule resumes with the run's own "
            "trainer.max_epochs)"
            if any(line.startswith("scheduler.T_max") for line in ignored)
            else ""
        )
        raise UserError(
            f"resuming from {path} restores its optimizer and lr schedule, so these settings would be "
            "ignored:\n  " + "\n  ".join(ignored) + follows + "\nDrop those overrides to resume the run as "
            "it was trained, or train a new run (drop ckpt_path)"
        )
    if changed:
        log.warning(
            "resuming with settings that differ from the checkpoint's run:\n  %s", "\n  ".join(changed)
        )


def _leaf_keys(tree: Any, prefix: str = "") -> set[str]:
    if isinstance(tree, Mapping) and tree:
        return set().union(*(_leaf_keys(v, f"{prefix}{k}.") for k, v in tree.items()))
    return {prefix.rstrip(".")} if prefix else set()


def _get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def resume_command(cfg: DictConfig) -> str:
    """The command that continues this run (a single run, or one job of a sweep) from its ``last.ckpt``,
    in its own folder."""
    try:
        hydra = HydraConfig.get()
        overrides, sweep = list(hydra.overrides.task), hydra.mode == RunMode.MULTIRUN
    except ValueError:  # not under @hydra.main
        overrides, sweep = [], False
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in INVOCATION_KEYS]
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "train.py"
    args = [*keep, *(["hydra.mode=RUN"] * sweep), f"hydra.run.dir={cfg.paths.output_dir}", "ckpt_path=last"]
    return f"python {script} " + " ".join(shlex.quote(a) for a in args)


def stop_message(cfg: DictConfig, reason: str) -> str:
    """``reason``, what is kept, and the command that resumes the run (or that there is none yet)."""
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    try:  # memory-mapped: only the epoch counter is read, even from a large checkpoint
        epochs = int(torch.load(last, map_location="cpu", mmap=True, weights_only=False)["epoch"]) + 1
    except Exception:  # noqa: BLE001 - no readable checkpoint: nothing to resume from
        return f"{reason}. The run did not finish and has no checkpoint to resume from: run the same command again"
    return (
        f"{reason}. The run did not finish; {last} holds it after {epochs} epoch(s) (later progress is "
        f"redone). Resume it with:\n  {resume_command(cfg)}"
    )
