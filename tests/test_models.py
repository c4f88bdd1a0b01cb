import lightning as L
import pytest
import timm
import torch
from hydra.utils import instantiate

from dml.builders import build_module
from dml.errors import UserError
from dml.models import LinearHead, SmallCNN, TimmBackbone
from dml.models.backbones import pool_features


def test_pooling_variants():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(pool_features(x, "avgmax"), x.mean((2, 3)) + x.amax((2, 3)))
    with pytest.raises(ValueError):
        pool_features(x, "sum")


def test_small_cnn_and_head_give_unit_embeddings():
    backbone = SmallCNN(in_chans=1, width=8)
    head = LinearHead(backbone.num_features, 16)
    z = head(backbone(torch.randn(4, 1, 28, 28)))
    assert z.shape == (4, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_timm_backbones_conv_and_token(name):
    backbone = TimmBackbone(name, pooling="avgmax")
    size = backbone.data_config["input_size"][1:]
    assert backbone(torch.randn(2, 3, *size)).shape == (2, backbone.num_features)


def test_frozen_batchnorm_stays_in_eval_mode():
    backbone = TimmBackbone("test_resnet", freeze_bn=True)
    backbone.train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())


def test_unknown_backbone_name_is_a_user_error():
    with pytest.raises(UserError, match="not a timm model"):
        TimmBackbone("resnet5000")


def test_pretrained_without_network_names_pretrained_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="backbone.pretrained_file"):
        TimmBackbone("test_resnet", pretrained=True)


def test_pretrained_file_loads_local_weights(tmp_path):
    source = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = TimmBackbone("test_resnet", pretrained_file=str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(backbone.model.state_dict()[key], value)
    with pytest.raises(UserError, match="does not exist"):
        TimmBackbone("test_resnet", pretrained_file=str(tmp_path / "missing.pth"))


def fit_on_cpu(module, datamodule, **trainer_args) -> L.Trainer:
    """Fit with a bare Lightning Trainer on CPU (no logger, checkpoints or progress bar)."""
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        **trainer_args,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_param_groups_take_their_lr_multipliers(compose_cfg):
    cfg = compose_cfg(["model.lr_mult.loss=50", "optimizer.lr=0.01"])
    module = build_module(cfg)
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.01) and groups["loss/proxies"]["lr"] == pytest.approx(
        0.5
    )
    assert groups["loss/proxies"]["params"][0] is module.loss.proxies.weight


def test_warmup_keeps_the_backbone_frozen(compose_cfg):
    cfg = compose_cfg(
        ["experiment=synthetic_smoke", "model.warmup_epochs=1", "trainer.max_epochs=1", "~scheduler"]
    )

    datamodule, module = instantiate(cfg.dataset), build_module(cfg)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit_on_cpu(
        module,
        datamodule,
        max_epochs=1,
        limit_val_batches=0,
    )
    after = module.state_dict()
    assert all(
        torch.equal(before[k], after[k])
        for k in before
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k
    )
    assert not torch.equal(before["head.linear.weight"], after["head.linear.weight"])


def test_frozen_batchnorm_keeps_its_statistics_through_lightning_training(compose_cfg):
    """Lightning no longer calls train() at fit start: BatchNorm ran on batch statistics and moved its
    running statistics in every freeze_bn recipe until the module applied the backbone's mode itself."""
    cfg = compose_cfg(["experiment=synthetic_smoke", "backbone.freeze_bn=true", "trainer.accelerator=cpu"])
    datamodule, module = instantiate(cfg.dataset), build_module(cfg)
    before = {k: v.clone() for k, v in module.state_dict().items() if "running" in k}
    assert before
    modes = []
    module.on_train_batch_start = lambda *args: modes.extend(
        m.training for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    fit_on_cpu(
        module,
        datamodule,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
    )
    assert modes and not any(modes), "BatchNorm in training mode during a training step"
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_epoch_schedule_steps_once_per_epoch_with_gradient_accumulation(compose_cfg, accumulate):
    """StepLR(1, 0.5) halves the lr once per epoch whatever accumulate_grad_batches is: the schedule's
    frequency counted optimizer steps while Lightning counts batches, so with accumulation it fired
    several times an epoch."""
    cfg = compose_cfg(
        [
            "experiment=synthetic_smoke",
            "scheduler=step",
            "scheduler.step_size=1",
            "dataset.images_per_mode=20",
        ]
    )
    datamodule, module = instantiate(cfg.dataset), build_module(cfg)
    seen = []
    module.on_train_epoch_start = lambda: seen.append(module.trainer.optimizers[0].param_groups[0]["lr"])
    fit_on_cpu(
        module,
        datamodule,
        max_epochs=3,
        limit_train_batches=12,  # with 2 accumulated, the old frequency (6 steps) fired at batches 6 and 12
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )
    base = cfg.optimizer.lr
    assert seen == pytest.approx([base, base / 2, base / 4])
