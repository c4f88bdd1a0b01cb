"""The tasks train.py, evaluate.py and prepare.py run: a run folder claimed, the objects built (by
:mod:`dml.builders`), trained or tested, the metrics printed and written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from dml.builders import build_data_and_module, build_trainer
from dml.callbacks import EmbeddingPictures, MonitoredMetricsCheck
from dml.checkpoints import (
    check_same_model,
    data_state,
    load_checkpoint,
    read_checkpoint,
    without_pretrained_weights,
)
from dml.command import is_multirun
from dml.config import check_types
from dml.errors import UserError
from dml.io import write_atomic
from dml.log import get_logger
from dml.runs import (
    RunStopped,
    check_resume,
    claim_run_dir,
    is_launching_process,
    release_replaced,
    resolve_ckpt_path,
    stop_message,
)

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import ModelCheckpoint


log = get_logger(__name__)

# Keys of a run config that evaluate.py takes from the checkpoint (the model and its data) unless the
# command line overrides them; everything else (trainer, paths, ...) is evaluate's own.
MODEL_KEYS = ("dataset", "backbone", "head", "loss", "model", "seed")


def prepare(cfg: DictConfig) -> dict[str, float]:
    """Prepare a dataset once (find or download, extract, check, index) and print its splits."""
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info("%s is ready:\n%s", datamodule.name, datamodule.summary())
    return {}


def _metrics_table(title: str, metrics: dict[str, float]) -> str:
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    console = Console(width=100, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - rendered to text only
    console.print(table)
    return f"{title}\n{console.export_text()}"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model, then test its best checkpoint. Returns every logged metric.

    Raises:
        UserError: the run folder holds another run, the checkpoint to resume from is unusable or was
            trained with other optimizer settings, a monitored metric is not logged, the loss diverged.
        RunStopped: a signal (SIGTERM, SIGINT) stopped training; the message says how to resume.
    """
    output_dir = Path(cfg.paths.output_dir)
    check_types(cfg)  # before the folder is claimed: a typo must not set a finished run aside
    claim_run_dir(output_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite")))
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    L.seed_everything(cfg.seed, workers=True)
    payload = read_checkpoint(ckpt) if ckpt is not None else None
    # a resumed run reads the classes it was trained on (a user's data), whatever the folder holds now
    stored = data_state(payload, payload["dml_config"]) if payload is not None else None
    datamodule, module = build_data_and_module(cfg, stored)
    if ckpt is not None and payload is not None:
        check_same_model(ckpt, payload["state_dict"], module)
        check_resume(ckpt, payload["dml_config"], cfg)
    del payload
    if is_launching_process():  # one writer: under DDP every process runs this function
        write_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        if hasattr(datamodule, "split_description"):  # a user's data: which classes went where
            _write_json_atomic(output_dir / "split.json", datamodule.split_description())
    monitored = {"monitor.metric": cfg.get("monitor", {}).get("metric")}
    if is_multirun() and cfg.get("optimized_metric"):
        monitored["optimized_metric"] = cfg.optimized_metric
    trainer = build_trainer(cfg, [MonitoredMetricsCheck(monitored)])
    for logger in trainer.loggers:
        logger.log_hyperparams(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)))
    stage = "training"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        checkpoint = cast("ModelCheckpoint | None", trainer.checkpoint_callback)
        best = checkpoint.best_model_path if checkpoint else ""
        if cfg.get("test"):
            stage = "testing"
            if not best:
                log.info(
                    "no checkpoint was saved (fast_dev_run or no checkpoint callback): testing the final weights"
                )
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
            metrics.update(module.test_results)
            log.info(
                "%s",
                _metrics_table(
                    f"test ({datamodule.name}, unseen classes) - checkpoint {Path(best).name or 'final'}",
                    module.test_results,
                ),
            )
        if best:
            log.info("best checkpoint: %s", best)
            log.info("last checkpoint: %s", Path(best).parent / "last.ckpt")
        log.info("logs and config: %s", output_dir)
        if module.test_results and trainer.is_global_zero:
            _write_json_atomic(output_dir / "test_metrics.json", module.test_results)
        if trainer.is_global_zero:
            (output_dir / "FAILED").unlink(missing_ok=True)  # left by an earlier failed try of this job
            release_replaced(output_dir)
    except SystemExit as e:  # Lightning ends a run stopped by SIGTERM or Ctrl+C (SIGINT) with SystemExit
        if isinstance(e, SIGTERMException) or trainer.interrupted:
            name, code = ("SIGTERM", 143) if isinstance(e, SIGTERMException) else ("SIGINT (Ctrl+C)", 130)
            reason = f"{stage} was stopped by {name}"
            raise RunStopped(stop_message(cfg, reason) if trainer.is_global_zero else reason, code) from e
        raise
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
            import wandb

            wandb.finish()
    return metrics


def _command_line_keys() -> list[str]:
    """Config keys the user set on the command line (``a.b=1``, ``+a=1``, ``group=option``)."""
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:  # not under @hydra.main (tests composing by hand)
        return []
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test one checkpoint, or several (``ckpt_path=[a.ckpt,b.ckpt]``) side by side.

    Each checkpoint's metrics are printed, written to ``<checkpoint>.metrics.json`` beside it, and its pictures drawn
    into ``<evaluate run dir>/pictures/<run>_<checkpoint>/``. Several checkpoints end in one table.
    Returns the metrics of the last one.
    """
    paths = cfg.ckpt_path if isinstance(cfg.ckpt_path, list | ListConfig) else [cfg.ckpt_path]
    if not paths or None in paths:
        raise UserError(
            "ckpt_path= must be given: python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt (or "
            "ckpt_path=[a.ckpt,b.ckpt] to compare several)"
        )
    check_types(cfg, ("trainer",))
    results = {}
    for path in paths:
        ckpt = Path(str(path)).expanduser()
        results[f"{ckpt.parent.parent.name}/{ckpt.name}"] = _evaluate_checkpoint(cfg, ckpt)
    if len(results) > 1:
        log.info("%s", _comparison_table(results))
    return list(results.values())[-1]


def _evaluate_checkpoint(cfg: DictConfig, ckpt_path: Path) -> dict[str, float]:
    run_cfg, state_dict, data_state = load_checkpoint(ckpt_path)
    keys = _command_line_keys()
    for key in keys:
        if key.split(".")[0] in MODEL_KEYS:
            # A group choice (dataset=cub) replaces the stored group; a key (dataset.root=...) patches it.
            value = OmegaConf.select(cfg, key)
            if isinstance(value, DictConfig | ListConfig):  # resolved here, against this command's paths
                value = OmegaConf.to_container(value, resolve=True)
            OmegaConf.update(run_cfg, key, value, merge="." in key, force_add=True)
    if any(k.startswith("paths.") for k in keys) and not {"dataset", "dataset.root"} & set(keys):
        _move_data_root(run_cfg, cfg)
    without_pretrained_weights(run_cfg)  # a backbone=... override brings its pretrained: true back
    if "dataset" in keys:  # another dataset: its own split, not the one the run kept
        data_state = {}
    L.seed_everything(run_cfg.get("seed", 0), workers=True)
    datamodule, module = build_data_and_module(run_cfg, data_state)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {ckpt_path} was written by a different model than the one configured now "
            f"(backbone {run_cfg.backbone.get('name', run_cfg.backbone._target_)}, head {run_cfg.head.out_dim}-d); "
            "drop the model overrides from the command line to evaluate it as trained.\n"
            + "\n".join(str(e).splitlines()[:3])
        ) from e
    # Embeddings computed at the training precision reproduce the metrics training printed.
    precision = cfg.trainer.precision if "trainer.precision" in keys else run_cfg.trainer.get("precision")
    pictures = EmbeddingPictures(
        str(Path(cfg.paths.output_dir) / "pictures" / f"{ckpt_path.parent.parent.name}_{ckpt_path.stem}")
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[pictures],
        default_root_dir=cfg.paths.output_dir,
        precision=precision or cfg.trainer.precision,
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = module.test_results
    log.info("%s", _metrics_table(f"test ({datamodule.name}, unseen classes) - {ckpt_path.name}", metrics))
    record = {"checkpoint": str(ckpt_path), "metrics": metrics}
    # Named by the dataset when it is not the one the checkpoint was trained on.
    other = f".{datamodule.name}" if "dataset" in keys else ""
    out = ckpt_path.with_name(f"{ckpt_path.stem}{other}.metrics.json")
    try:
        _write_json_atomic(out, record)
    except UserError as e:  # a read-only checkpoint folder: the evaluation's own folder keeps them
        out = Path(cfg.paths.output_dir) / f"{ckpt_path.parent.parent.name}_{out.name}"
        log.warning("%s; writing the metrics to %s instead", e, out)
        _write_json_atomic(out, record)
    log.info("metrics written to %s", out)
    return metrics


def _move_data_root(run_cfg: DictConfig, cfg: DictConfig) -> None:
    """Point the stored dataset root into this command's ``paths.data_dir`` (same place within it)."""
    root, stored_data_dir = run_cfg.dataset.get("root"), run_cfg.get("paths", {}).get("data_dir")
    if not root:
        return
    try:
        relative = Path(root).relative_to(stored_data_dir) if stored_data_dir else Path(Path(root).name)
    except ValueError:
        relative = Path(Path(root).name)
    run_cfg.dataset.root = str(Path(cfg.paths.data_dir) / relative)
    log.info("dataset.root: %s (was %s when trained)", run_cfg.dataset.root, root)


def _comparison_table(results: dict[str, dict[str, float]]) -> str:
    table = Table(title="checkpoints compared")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for m in results.values() for k in m))
    for key in keys:
        table.add_row(key, *(f"{m[key]:.4f}" if key in m else "-" for m in results.values()))
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - rendered to text only
    console.print(table)
    return console.export_text()
