"""Entry-point wiring: build datamodule, module, trainer and logger from a config; train; evaluate."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from dml.callbacks import EmbeddingPictures
from dml.errors import UserError
from dml.log import get_logger
from dml.models import DMLModule

log = get_logger(__name__)

# Keys of a run config that evaluate.py takes from the checkpoint (the model and its data) unless the
# command line overrides them; everything else (trainer, paths, ...) is evaluate's own.
MODEL_KEYS = ("dataset", "backbone", "head", "loss", "model", "seed")


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
        run_config=OmegaConf.to_container(cfg, resolve=True),
        **cfg.model,
    )


def build_data_and_module(cfg: DictConfig) -> tuple[L.LightningDataModule, DMLModule]:
    """The datamodule and module of a run config; image datasets take the backbone's normalisation."""
    datamodule = instantiate(cfg.dataset)
    module = build_module(cfg)
    if hasattr(datamodule, "use_backbone_config"):
        datamodule.use_backbone_config(getattr(module.backbone, "data_config", {}))
    return datamodule, module


def prepare(cfg: DictConfig) -> dict[str, float]:
    """Prepare a dataset once (find or download, extract, check, index) and print its splits."""
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info("%s is ready:\n%s", datamodule.name, datamodule.summary())
    return {}


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model, then test its best checkpoint. Returns every logged metric."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    datamodule, module = build_data_and_module(cfg)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.get("test"):
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
        if module.test_results:
            _write_json_atomic(output_dir / "test_metrics.json", module.test_results)
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
            import wandb

            wandb.finish()
    return metrics


def load_checkpoint(ckpt_path: Path) -> tuple[DictConfig, dict[str, Any]]:
    """The run config stored in a checkpoint written by train.py, and its state dict."""
    if not ckpt_path.is_file():
        raise UserError(
            f"checkpoint {ckpt_path} not found; pass ckpt_path=<path to a .ckpt written by train.py>"
        )
    try:
        payload = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any load failure means the file is not a usable checkpoint
        raise UserError(
            f"{ckpt_path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(payload, dict) or not payload.get("dml_config") or "state_dict" not in payload:
        raise UserError(
            f"{ckpt_path} is not a checkpoint written by dml's train.py (it has no dml_config); "
            "evaluate a checkpoint from a dml run's checkpoints/ folder"
        )
    return OmegaConf.create(payload["dml_config"]), payload["state_dict"]


def _command_line_keys() -> list[str]:
    """Config keys the user set on the command line (``a.b=1``, ``+a=1``, ``group=option``)."""
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:  # not under @hydra.main (tests composing by hand)
        return []
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test one checkpoint, or several (``ckpt_path=[a.ckpt,b.ckpt]``) side by side.

    Each checkpoint's metrics are printed, written to metrics.json beside it, and its pictures drawn
    into ``<evaluate run dir>/pictures/<run>_<checkpoint>/``. Several checkpoints end in one table.
    Returns the metrics of the last one.
    """
    paths = cfg.ckpt_path if isinstance(cfg.ckpt_path, list | ListConfig) else [cfg.ckpt_path]
    if not paths:
        raise UserError("ckpt_path is empty; pass ckpt_path=<file>.ckpt or ckpt_path=[a.ckpt,b.ckpt]")
    results = {}
    for path in paths:
        ckpt = Path(str(path)).expanduser()
        results[f"{ckpt.parent.parent.name}/{ckpt.name}"] = _evaluate_checkpoint(cfg, ckpt)
    if len(results) > 1:
        log.info("%s", _comparison_table(results))
    return list(results.values())[-1]


def _evaluate_checkpoint(cfg: DictConfig, ckpt_path: Path) -> dict[str, float]:
    run_cfg, state_dict = load_checkpoint(ckpt_path)
    keys = _command_line_keys()
    for key in keys:
        if key.split(".")[0] in MODEL_KEYS:
            OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), force_add=True)
    L.seed_everything(run_cfg.get("seed", 0), workers=True)
    datamodule, module = build_data_and_module(run_cfg)
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
        Path(cfg.paths.output_dir) / "pictures" / f"{ckpt_path.parent.parent.name}_{ckpt_path.stem}"
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
    out = ckpt_path.parent / "metrics.json"
    _write_json_atomic(out, {"checkpoint": str(ckpt_path), "metrics": metrics})
    log.info("metrics written to %s", out)
    return metrics


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


def _find_user_error(exc: BaseException) -> UserError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_cli(task: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    """Run ``task`` for a ``@hydra.main`` shim: user errors end in their message alone (exit code 2).

    Returns the value of ``optimized_metric`` when configured, for Hydra sweepers.
    """
    try:
        metrics = task(cfg)
    except Exception as e:
        user_error = _find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)  # noqa: T201 - the message a user must see
        sys.exit(2)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None
