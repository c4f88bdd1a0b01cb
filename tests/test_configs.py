"""Every option of every config group composes with the real defaults and instantiates."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from dml.builders import build_module
from dml.data import RetrievalDataModule
from dml.models import DMLModule
from tests.conftest import CONF

NOT_GROUPS = {"study"}  # conf/study: the specs of make study (dml.study), not part of a run's config
GROUPS = {
    g.name: sorted(p.stem for p in g.glob("*.yaml"))
    for g in sorted(CONF.iterdir())
    if g.is_dir() and g.name not in NOT_GROUPS
}
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


RGB_ONLY = {"bn_inception", "googlenet"}  # networks whose weights fix 3 input channels
USER_DATA = {"folder", "table"}  # datasets whose number of classes is read from the data


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(compose_cfg, group, option):
    if group in ("hydra", "paths", "local"):
        cfg = compose_cfg([])  # selected by default: composing the default config covers it
    elif group == "backbone" and option in RGB_ONLY:
        cfg = compose_cfg([f"{group}={option}", "dataset=cub"])  # the default MNIST is grayscale
    elif group == "dataset" and option in USER_DATA:
        # the count is read from the data when built (tests/test_own_images.py); given here
        cfg = compose_cfg([f"{group}={option}", "dataset.num_train_classes=5"])
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


@pytest.mark.parametrize("dataset", GROUPS["dataset"])
def test_a_dataset_choice_sets_data_only(compose_cfg, dataset):
    """dataset= used to pick the backbone and rewrite optimizer.lr, warm-up and epochs."""
    default = OmegaConf.to_container(compose_cfg([]), resolve=False)
    chosen = OmegaConf.to_container(compose_cfg([f"dataset={dataset}"]), resolve=False)
    default.pop("dataset"), chosen.pop("dataset")
    assert chosen == default


PRECEDENCE = {
    # overrides: (optimizer, backbone lr the optimizer receives, warm-up epochs)
    ("dataset=cub", "optimizer=adam"): ("Adam", 1e-5, 0),
    ("dataset=cub", "preset=imagenet_finetune"): ("AdamW", 1e-4, 1),
    ("dataset=cub", "preset=imagenet_finetune", "optimizer=adam"): ("Adam", 1e-5, 1),
    ("dataset=cub", "preset=imagenet_finetune", "optimizer=adamw"): ("AdamW", 1e-3, 1),
    ("experiment=antico_cub_r50", "optimizer=adamw"): ("AdamW", 1e-3, 0),
    ("preset=imagenet_finetune", "experiment=antico_cub_r50"): ("Adam", 1e-5, 0),
    ("experiment=proxy_anchor_sop_r50", "optimizer.lr=3e-4"): ("AdamW", 3e-4, 1),
    ("experiment=proxy_anchor_sop_r50", "optimizer=adam"): ("Adam", 1e-5, 1),
    ("experiment=proxy_anchor_cub_r50", "scheduler=cosine"): ("AdamW", 1e-4, 5),
    ("experiment=proxy_anchor_cub_r50", "~scheduler"): ("AdamW", 1e-4, 5),
    ("experiment=antico_cub_r50", "loss=ms"): ("Adam", 1e-5, 0),
}


@pytest.mark.parametrize("overrides", list(PRECEDENCE), ids=[" ".join(o) for o in PRECEDENCE])
def test_group_precedence(compose_cfg, overrides):
    """An explicit group choice trains with that option's own values; a value override beats all;
    a recipe's setup beats a preset's."""
    cfg = compose_cfg(list(overrides))
    if "pretrained" in cfg.backbone:
        cfg.backbone.pretrained = False
    module = build_module(cfg)
    config = module.configure_optimizers()  # builds the scheduler too: a stray key would fail here
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    name, lr, warmup = PRECEDENCE[overrides]
    chosen = {o.split("=")[0].lstrip("~"): o.split("=")[-1] for o in overrides}
    if "loss" in chosen:  # the recipe's loss values stay out of a loss chosen instead of its own
        assert list(module.loss.terms) == list(compose_cfg([f"loss={chosen['loss']}"]).loss.terms)
    assert type(optimizer).__name__ == name
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["backbone"] == pytest.approx(lr)
    assert module.warmup_epochs == warmup
