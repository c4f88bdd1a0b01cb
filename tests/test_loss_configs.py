"""Every conf/loss file trains on MNIST and logs each of its terms."""

import csv

import pytest
from hydra.utils import instantiate

from dml.config import loss_names
from dml.tasks import train

LOSSES = loss_names()
DEFAULT = "proxy_anchor_antico"  # the everyday tier trains the default loss; the others are slow
TRAINED = [name if name == DEFAULT else pytest.param(name, marks=pytest.mark.slow) for name in LOSSES]


@pytest.mark.parametrize("name", TRAINED)
def test_loss_config_trains_three_epochs_on_mnist_and_logs_every_term(compose_cfg, tmp_path, name):
    cfg = compose_cfg(
        [
            f"loss={name}",
            "trainer.max_epochs=3",
            "+trainer.limit_train_batches=8",
            "trainer.log_every_n_steps=4",
            "callbacks=no_progress",
            "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu",
            "model.nmi=false",
            "test=false",
        ]
    )
    metrics = train(cfg)
    assert metrics["val/recall@1"] > 0.3  # 4 unseen digits: chance is about 0.25
    text = next((tmp_path / "run").glob("csv/version_*/metrics.csv")).read_text()
    rows = list(csv.DictReader(text.splitlines()))
    logged = {k for row in rows for k, v in row.items() if v}
    for term in cfg.loss.terms:
        assert f"train/loss/{term}" in logged
    assert max(int(r["epoch"]) for r in rows if r.get("epoch")) == 2


@pytest.mark.parametrize("name", LOSSES)
def test_antico_weight_is_exposed_wherever_antico_is_a_term(compose_cfg, name):
    cfg = compose_cfg([f"loss={name}", "loss.antico_weight=0.125"] if "antico" in name else [f"loss={name}"])
    loss = instantiate(cfg.loss)
    has_antico = any(type(t.loss).__name__ == "AntiCoLoss" for t in loss.terms.values())
    assert has_antico == ("antico_weight" in cfg.loss)
    if has_antico:
        assert loss.weights["antico"] == 0.125


@pytest.mark.parametrize("name", LOSSES)
def test_every_parameter_of_a_loss_config_gets_a_gradient(compose_cfg, name):
    """DDP refuses a parameter that no term uses: pair AntiCo used to carry an unused proxy bank."""
    import torch

    loss = instantiate(compose_cfg([f"loss={name}"]).loss)
    embeddings = torch.nn.functional.normalize(torch.randn(24, loss.embedding_size), dim=1).requires_grad_()
    labels = torch.arange(6).repeat_interleave(4)
    loss(embeddings, labels)["loss"].backward()
    unused = [n for n, p in loss.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters no term of loss={name} uses: {unused}"
