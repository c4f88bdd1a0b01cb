"""Recipe cards: each conf/experiment recipe gives the optimizer, scheduler, sampler, loss and trainer the
published settings (DESIGN §2 and §6, the papers and their official code), or departs where its header
says so. What is checked is what the built objects receive, not what the config files say."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from dml.builders import build_module
from dml.losses import ProxyBank
from dml.tasks import train
from tests.benchmark_fixtures import BUILDERS
from tests.conftest import CONF, compose_config


@dataclass
class Published:
    """The published settings of one recipe.

    groups: optimizer group -> (lr at the first epoch, weight decay).
    lr_factor: epoch -> lr / first-epoch lr, the same for every group.
    batch: ("class_balanced", P, K) or ("random", B).
    terms: term -> weight; settings: "term.attribute" (of the term's loss) or "term.miner.attribute".
    backbone: (timm name or class, pooling (a ViT's token_pool), BatchNorm frozen).
    optimizer_settings: further optimizer defaults (e.g. AdamW's eps); crop_scale: the training crops'
    area range (image benchmarks).
    clip: (gradient_clip_val, gradient_clip_algorithm) or None.
    proxy_init_std: None for kaiming-normal proxies (or no proxies).
    """

    optimizer: str
    groups: dict[str, tuple[float, float]]
    lr_factor: dict[int, float]
    epochs: int
    warmup: int
    batch: tuple
    embedding: int
    backbone: tuple[str, str, bool]
    terms: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    miners: dict[str, str] = field(default_factory=dict)
    clip: tuple[float, str] | None = None
    proxy_init_std: float | None = None
    metric: str = "cosine"  # euclidean: un-normalised embeddings, scored by Euclidean distance
    optimizer_settings: dict[str, float] = field(default_factory=dict)
    crop_scale: tuple[float, float] | None = None
    bn_momentum: float | None = None


# AntiCo official code (antico_runs.sh, parameters.py, criteria/antico.py): Adam 1e-5 with wd 4e-4 on the
# network, proxies x2000 without wd and drawn randn/8, MultiStepLR(tau 100, gamma 0.5), no warm-up,
# batch 90 = 45 x 2, 512-d, L = 0.0035 * ProxyAnchor(alpha 64, delta 0.1) + 1.0 * exp(-R(batch proxies)).
ANTICO = dict(
    optimizer="Adam",
    groups={"backbone": (1e-5, 4e-4), "head": (1e-5, 4e-4), "loss/proxies": (2e-2, 0.0)},
    warmup=0,
    batch=("class_balanced", 45, 2),
    embedding=512,
    backbone=("resnet50.tv_in1k", "avgmax", True),
    terms={"proxy_anchor": 0.0035, "antico": 1.0},
    settings={
        "proxy_anchor.alpha": 64,
        "proxy_anchor.delta": 0.1,
        "antico.variant": "batch_proxy",
        "antico.eps": 0.5,
        "antico.gamma": 1.0,
        "antico.scale": "official",
        "antico.form": "exp",
    },
    proxy_init_std=0.125,
)

# Proxy-Anchor official code (README commands, train.py defaults): AdamW, wd 1e-4 on every group,
# proxies x100, StepLR per epoch, random batches (shuffle, drop_last), clip_grad_value_ 10, 60 epochs,
# alpha 32, delta 0.1, 512-d, GAP + GMP.
PROXY_ANCHOR = dict(
    optimizer="AdamW",
    epochs=60,
    embedding=512,
    terms={"proxy_anchor": 1.0},
    settings={"proxy_anchor.alpha": 32, "proxy_anchor.delta": 0.1},
    clip=(10, "value"),
)


def proxy_anchor(lr, warmup, batch, freeze_bn, step, gamma, backbone="resnet50.tv_in1k", bn_momentum=None):
    return Published(
        groups={"backbone": (lr, 1e-4), "head": (lr, 1e-4), "loss/proxies": (100 * lr, 1e-4)},
        lr_factor={0: 1.0, step - 1: 1.0, step: gamma, 59: gamma ** (59 // step)},
        warmup=warmup,
        batch=("random", batch),
        backbone=(backbone, "avgmax", freeze_bn),
        crop_scale=(0.08, 1.0),
        bn_momentum=bn_momentum,
        **PROXY_ANCHOR,
    )


# EPS paper §5.2 and its framework (Roth et al. 2020, parameters.py): Adam 1e-5, wd 4e-4, constant lr
# (tau 1000 > 150 epochs), batch 112, 150 epochs, 128-d after average pooling, frozen BN. 4 per class is
# the recipes' listed departure from the framework's 2.
EPS = dict(
    optimizer="Adam",
    lr_factor={0: 1.0, 75: 1.0, 149: 1.0},
    epochs=150,
    warmup=0,
    batch=("class_balanced", 28, 4),
    embedding=128,
    backbone=("resnet50.tv_in1k", "avg", True),
)
EPS_GROUPS = {"backbone": (1e-5, 4e-4), "head": (1e-5, 4e-4)}
EPS_TRIPLET = dict(
    groups=EPS_GROUPS,
    terms={"triplet": 1.0},
    settings={
        "triplet.margin": 0.2,
        "triplet.squared": True,
        "triplet.reduction": "mean",
        "triplet.miner.negatives": "semihard",
        "triplet.miner.per_anchor": True,
        "triplet.miner.margin": 0.2,
    },
    miners={"triplet": "EasyPositiveMiner"},
)
EPS_MARGIN = dict(
    groups=EPS_GROUPS | {"loss/margin": (5e-4, 0.0)},
    terms={"margin": 1.0},
    settings={
        "margin.alpha": 0.2,
        "margin.per_class": True,
        "margin.nu": 0.0,
        "margin.miner.negatives": "distance_weighted",
        "margin.miner.cutoff": 0.5,
        "margin.miner.nonzero_loss_cutoff": 1.4,
    },
    miners={"margin": "EasyPositiveMiner"},
)
EPS_MS = dict(
    groups=EPS_GROUPS,
    terms={"ms": 1.0},
    settings={
        "ms.alpha": 2.0,
        "ms.beta": 50.0,
        "ms.base": 1.0,
        "ms.miner.positives": "easy",
        "ms.miner.negative_reference": "hardest_positive",
        "ms.miner.epsilon": 0.1,
    },
    miners={"ms": "MultiSimilarityMiner"},
)

# EPS §5.1 (MNIST even/odd): the paper's triplet (squared D), EPS vs random positives, 2-d embedding;
# network and optimiser are the recipe's listed departures (AdamW 1e-3, cosine over 10 epochs).
MNIST_PARITY = dict(
    optimizer="AdamW",
    groups={"backbone": (1e-3, 1e-4), "head": (1e-3, 1e-4)},
    lr_factor={0: 1.0, 9: 0.5 * (1 + math.cos(9 / 10 * math.pi))},  # CosineAnnealingLR over 10 epochs
    epochs=10,
    warmup=0,
    batch=("class_balanced", 2, 30),
    embedding=2,
    backbone=("SmallCNN", "avg", False),
)
PARITY_TRIPLET = {
    "triplet.margin": 0.2,
    "triplet.squared": True,
    "triplet.reduction": "mean",
    "triplet.normalize_embeddings": False,  # the plane R^2
}
PARITY_MARGIN = {  # EPS §5.2.3's margin loss, in the plane R^2
    "margin.alpha": 0.2,
    "margin.per_class": True,
    "margin.nu": 0.0,
    "margin.normalize_embeddings": False,
}


def parity(term: str, settings: dict[str, Any], eps: bool) -> Published:
    """An MNIST even/odd card: EPS positives with one semi-hard negative each, or one random triplet."""
    miner = (
        {"per_anchor": True, "negatives": "semihard", "margin": 0.2, "normalize_embeddings": False}
        if eps
        else {"per_anchor": 1}
    )
    groups = MNIST_PARITY["groups"] | ({"loss/margin": (5e-4, 0.0)} if term == "margin" else {})
    return Published(
        **MNIST_PARITY | {"groups": groups},
        terms={term: 1.0},
        settings=settings | {f"{term}.miner.{k}": v for k, v in miner.items()},
        miners={term: "EasyPositiveMiner" if eps else "RandomTripletMiner"},
        metric="euclidean",
    )


# HIER official code (scripts/DINO/hier_CUB.sh, train.py, utils.py): AdamW 5e-6 (batch 180 = 90 x 2 per
# class), wd 1e-2 on every group, eps 1e-4, proxies x1e4, head x1, constant lr, 1 epoch with the
# backbone's lr at 0, gradient values clipped at 10, 100 epochs, 128-d, PA alpha 32 / mrg 0.1,
# crops of scale (0.2, 1); the Proxy-Anchor baseline, without HIER's own term.
HIER_DINO = Published(
    optimizer="AdamW",
    groups={"backbone": (5e-6, 1e-2), "head": (5e-6, 1e-2), "loss/proxies": (5e-2, 1e-2)},
    lr_factor={0: 1.0, 50: 1.0, 99: 1.0},
    epochs=100,
    warmup=1,
    batch=("class_balanced", 90, 2),
    embedding=128,
    backbone=("vit_small_patch16_224.dino", "cls", False),
    terms={"proxy_anchor": 1.0},
    settings={"proxy_anchor.alpha": 32, "proxy_anchor.delta": 0.1},
    clip=(10, "value"),
    optimizer_settings={"eps": 1e-4},
    crop_scale=(0.2, 1.0),
)

PUBLISHED: dict[str, Published] = {
    "antico_cub_r50": Published(lr_factor={0: 1.0, 50: 1.0, 99: 1.0}, epochs=100, **ANTICO),
    "antico_cars_r50": Published(lr_factor={0: 1.0, 99: 1.0, 100: 0.5, 299: 0.5}, epochs=300, **ANTICO),
    "proxy_anchor_cub_r50": proxy_anchor(1e-4, 5, 120, True, step=5, gamma=0.5),
    "proxy_anchor_cars_r50": proxy_anchor(1e-4, 5, 120, True, step=10, gamma=0.5),
    "proxy_anchor_sop_r50": proxy_anchor(6e-4, 1, 180, False, step=20, gamma=0.25),
    "proxy_anchor_inshop_r50": proxy_anchor(6e-4, 1, 180, False, step=20, gamma=0.25),
    # The README's Inception-BN commands.
    "proxy_anchor_cub_bninception": proxy_anchor(
        1e-4, 1, 180, True, 10, 0.5, backbone="BNInception", bn_momentum=0.9
    ),
    "proxy_anchor_cars_bninception": proxy_anchor(
        1e-4, 1, 180, True, 20, 0.5, backbone="BNInception", bn_momentum=0.9
    ),
    "proxy_anchor_sop_bninception": proxy_anchor(
        6e-4, 1, 180, False, 20, 0.25, backbone="BNInception", bn_momentum=0.9
    ),
    "proxy_anchor_inshop_bninception": proxy_anchor(
        6e-4, 1, 180, False, 20, 0.25, backbone="BNInception", bn_momentum=0.9
    ),
    "antico_cub_bninception": Published(
        lr_factor={0: 1.0, 50: 1.0, 99: 1.0},
        epochs=100,
        **ANTICO | {"backbone": ("BNInception", "avgmax", True)},
    ),
    "antico_cars_bninception": Published(
        lr_factor={0: 1.0, 99: 1.0, 100: 0.5, 299: 0.5},
        epochs=300,
        **ANTICO | {"backbone": ("BNInception", "avgmax", True)},
    ),
    # The official AntiCo settings on CLIP's image tower (the recipe lists this as its departure).
    "antico_cub_clip_vitb16": Published(
        lr_factor={0: 1.0, 50: 1.0, 99: 1.0},
        epochs=100,
        **ANTICO | {"backbone": ("vit_base_patch16_clip_224.openai", "cls", False)},
    ),
    "proxy_anchor_cub_dino_vits16": HIER_DINO,
    "eps_cub_triplet": Published(**EPS, **EPS_TRIPLET),
    "eps_cars_triplet": Published(**EPS, **EPS_TRIPLET),
    "eps_cub_margin": Published(**EPS, **EPS_MARGIN),
    "eps_cars_margin": Published(**EPS, **EPS_MARGIN),
    "eps_cub_ms": Published(**EPS, **EPS_MS),
    "eps_cars_ms": Published(**EPS, **EPS_MS),
    "eps_mnist_parity": parity("triplet", PARITY_TRIPLET, eps=True),
    "mnist_parity_triplet": parity("triplet", PARITY_TRIPLET, eps=False),
    "eps_mnist_parity_margin": parity("margin", PARITY_MARGIN, eps=True),
    "mnist_parity_margin": parity("margin", PARITY_MARGIN, eps=False),
}
UNPUBLISHED = {"mnist_proxy_anchor", "synthetic_smoke"}  # the package's own runs; headers say so

RECIPES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_every_recipe_has_a_card():
    assert set(RECIPES) == set(PUBLISHED) | UNPUBLISHED


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_header_cites_its_source_and_lists_its_departures(name):
    header = "\n".join(
        line
        for line in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
        if line.startswith("#")
    )
    assert re.search(r"^# Source: \S", header, re.M), f"{name}: no '# Source:' line"
    if name in PUBLISHED:
        assert re.search(r"^# Departures from the source:", header, re.M), f"{name}: departures not listed"


def lrs_by_epoch(module, epochs: int) -> tuple[list[dict[str, float]], torch.optim.Optimizer]:
    """Each group's lr in each epoch, from the module's own optimizer and scheduler."""
    config = module.configure_optimizers()
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
    out = []
    for _ in range(epochs):
        out.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        if scheduler is not None:
            optimizer.step()  # no gradients: changes nothing, but keeps the scheduler's order check quiet
            scheduler.step()
    return out, optimizer


def setting(loss, key: str) -> Any:
    term, *path = key.split(".")
    obj = loss.terms[term] if path[0] == "miner" else loss.terms[term].loss
    for attr in path:
        obj = getattr(obj, attr)
    return obj


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_gives_the_published_settings(compose_cfg, name):
    card = PUBLISHED[name]
    cfg = compose_cfg([f"experiment={name}", "trainer.accelerator=cpu"])
    if "pretrained" in cfg.backbone:
        cfg.backbone.pretrained = False  # no hub here; weights are not the point of this test
    module = build_module(cfg)
    datamodule = instantiate(cfg.dataset)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])

    lrs, optimizer = lrs_by_epoch(module, card.epochs)
    assert type(optimizer).__name__ == card.optimizer
    for key, value in card.optimizer_settings.items():
        assert all(g[key] == pytest.approx(value) for g in optimizer.param_groups), key
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == set(card.groups), "optimizer groups"
    for group, (lr, weight_decay) in card.groups.items():
        assert groups[group]["weight_decay"] == pytest.approx(weight_decay), f"{group} weight decay"
        for epoch, factor in card.lr_factor.items():
            assert lrs[epoch][group] == pytest.approx(lr * factor, rel=1e-9), f"{group} lr at epoch {epoch}"
    assert trainer.max_epochs == card.epochs
    assert module.warmup_epochs == card.warmup

    assert datamodule.sampler == card.batch[0]
    if card.crop_scale is not None:
        assert datamodule.crop_scale == card.crop_scale
    if card.batch[0] == "random":
        assert datamodule.batch_size == card.batch[1]
    else:
        _, p, k = card.batch
        assert (datamodule.batch_size // datamodule.samples_per_class, datamodule.samples_per_class) == (p, k)

    assert module.head.out_dim == card.embedding
    assert module.metric == card.metric and module.head.normalize == (card.metric == "cosine")
    name_, pooling, frozen = card.backbone
    backbone = module.backbone
    assert cfg.backbone.get("name", type(backbone).__name__) == name_
    pool = backbone.token_pool if getattr(backbone, "is_token_model", False) else backbone.pooling
    assert pool == pooling and backbone.freeze_bn == frozen
    batchnorm = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(p.requires_grad != frozen for m in batchnorm for p in m.parameters())
    if card.bn_momentum is not None:
        assert {m.momentum for m in batchnorm} == {card.bn_momentum}

    assert module.loss.weights == pytest.approx(card.terms)
    for key, value in card.settings.items():
        assert (
            setting(module.loss, key) == pytest.approx(value)
            if isinstance(value, float)
            else (setting(module.loss, key) == value)
        ), key
    for term, miner in card.miners.items():
        assert type(module.loss.terms[term].miner).__name__ == miner
    if "margin" in card.terms:  # one beta per class, initialised at 1.2
        beta = module.loss.terms["margin"].loss.beta
        assert beta.shape == (cfg.dataset.num_train_classes,) and torch.all(beta == 1.2)
    proxies = module.loss._proxies
    assert (proxies is not None) == any("proxies" in g for g in card.groups)
    assert module.loss.proxy_init_std == card.proxy_init_std
    if isinstance(proxies, ProxyBank) and card.proxy_init_std is not None:
        assert proxies.weight.std().item() == pytest.approx(card.proxy_init_std, rel=0.05)

    clip = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm.value)
    assert (clip if card.clip else clip[0]) == (card.clip or None)


# The recipes of issue 13's backbones run a debug=fast step on the official-layout fixture of their
# dataset (random weights, 32 px crops, batches of 4): every part the recipe wires is exercised once.
BACKBONE_RECIPES = [n for n in RECIPES if n.endswith(("_bninception", "_clip_vitb16", "_dino_vits16"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONE_RECIPES)
def test_backbone_recipe_runs_a_debug_step(tmp_path, name):
    dataset = next(d for d in BUILDERS if f"_{d}_" in name)
    fixture = BUILDERS[dataset](tmp_path / "data" / dataset)
    overrides = [
        f"experiment={name}",
        "debug=fast",
        f"paths.data_dir={tmp_path / 'data'}",
        f"dataset.num_train_classes={fixture['num_train_classes']}",
        "dataset.image_size=32",
        "dataset.resize_size=36",
        "dataset.batch_size=4",
        "dataset.num_workers=0",
        "dataset.download=false",
        "backbone.pretrained=false",
        "trainer.accelerator=cpu",
        "callbacks=no_progress",
        "trainer.enable_progress_bar=false",
    ]
    cfg = compose_config(overrides, tmp_path)
    if cfg.dataset.sampler == "class_balanced":
        cfg.dataset.samples_per_class = 2
    if "vit" in name:
        cfg.backbone.img_size = 32
    metrics = train(cfg)
    assert 0.0 <= metrics["test/recall@1"] <= 1.0
