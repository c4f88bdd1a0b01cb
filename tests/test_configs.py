"""Every option of every config group composes with the real defaults and instantiates."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from dml.data import RetrievalDataModule
from dml.models import DMLModule
from dml.tasks import build_module
from tests.conftest import CONF

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in sorted(CONF.iterdir()) if g.is_dir()}
CASES = [(group, option) for group, options in GROUPS.items() for option in options]


def test_every_group_of_the_layout_exists():
    expected = {
        "backbone",
        "head",
        "loss",
        "dataset",
        "trainer",
        "logger",
        "callbacks",
        "optimizer",
        "scheduler",
        "experiment",
        "hparams_search",
        "paths",
        "hydra",
        "debug",
    }
    assert expected <= set(GROUPS)
    assert all(GROUPS[g] for g in expected), "every group has at least one option"


def build_everything(cfg):
    if cfg.backbone.get("pretrained"):
        with open_dict(cfg):
            cfg.backbone.pretrained = False  # no hub here; weights are not the point of this test
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"  # the rest of the GPU config (precision, ...) still builds
            cfg.trainer.devices = 1
    datamodule = instantiate(cfg.dataset)
    assert isinstance(datamodule, RetrievalDataModule)
    module = build_module(cfg)
    assert isinstance(module, DMLModule)
    assert module.head.out_dim == cfg.head.out_dim
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    module.trainer = trainer
    assert module.configure_optimizers()
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(compose_cfg, group, option):
    if group in ("hydra", "paths", "local"):
        cfg = compose_cfg([])  # selected by default: composing the default config covers it
    else:
        cfg = compose_cfg([f"{group}={option}"])
    build_everything(cfg)


def test_evaluate_config_composes(compose_cfg):
    cfg = compose_cfg(["ckpt_path=some.ckpt"], name="evaluate")
    assert cfg.task_name == "evaluate" and cfg.ckpt_path == "some.ckpt"
    assert cfg.logger is None and cfg.callbacks is None


def test_antico_weight_is_one_override(compose_cfg):
    cfg = compose_cfg(["loss.antico_weight=0.25"])
    module = build_module(cfg)
    assert module.loss.weights["antico"] == 0.25


def test_default_run_is_proxy_anchor_plus_antico_on_mnist(compose_cfg):
    cfg = compose_cfg([])
    assert cfg.dataset._target_.endswith("MNISTDataModule")
    assert set(cfg.loss.terms) == {"proxy_anchor", "antico"}
    assert cfg.loss.terms.antico.loss.variant == "batch_proxy"
    assert cfg.trainer.use_distributed_sampler is False
