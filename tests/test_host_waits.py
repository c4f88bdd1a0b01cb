"""The training step leaves the device alone: the loss's finiteness is read from a copy made after the
forward pass, and the progress bar reads the logged metrics only every log_every_n_steps batches."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from torch.utils._python_dispatch import TorchDispatchMode

from dml.builders import build_data_and_module
from dml.callbacks import ProgressBar
from dml.models.finite import FiniteLossCheck


def test_the_first_non_finite_micro_batch_of_a_step_is_named_and_the_check_starts_over():
    check = FiniteLossCheck()
    check.add({"loss": torch.tensor(1.0), "a": torch.tensor(1.0)})
    check.add({"loss": torch.tensor(float("nan")), "a": torch.tensor(2.0)})
    check.add({"loss": torch.tensor(float("inf")), "a": torch.tensor(3.0)})
    bad = check.first_non_finite()
    assert bad is not None and bad["a"].item() == 2.0
    assert check.first_non_finite() is None  # the next step's micro-batches only
    check.add({"loss": torch.tensor(0.5, requires_grad=True) * 2})
    assert check.first_non_finite() is None


def test_the_progress_bar_reads_the_metrics_every_log_every_n_steps_batches(
    compose_cfg, monkeypatch, tmp_path
):
    reads: list[tuple[bool, int]] = []
    read = RichProgressBar.get_metrics

    def counted(self, trainer, module):
        reads.append((trainer.training, self._batches))  # batches ended so far
        return read(self, trainer, module)

    monkeypatch.setattr(RichProgressBar, "get_metrics", counted)
    cfg = compose_cfg(["experiment=synthetic_smoke", "trainer.accelerator=cpu", "trainer.max_epochs=1"])
    datamodule, module = build_data_and_module(cfg)
    bar = ProgressBar()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        use_distributed_sampler=False,
        callbacks=[bar],
        log_every_n_steps=3,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    batches = trainer.num_training_batches
    during = [n for training, n in reads if training]
    assert batches >= 6 and len(during) < batches
    assert set(during) == {1, 3, 6, batches}  # the first batch, every third, and the epoch's end


class HostReads(TorchDispatchMode):
    """Records the operators that make the host wait for the device on a GPU: reading a value
    (``.item()``, ``int()``, ``bool()``), counting a mask (``nonzero``, indexing by a mask), ``unique``,
    and the error checks of linear algebra."""

    SYNCS = {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "_unique2",
        "unique_dim",
        "_linalg_check_errors",
    }

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name == "index" and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())
        )
        if name in self.SYNCS or masked:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", ["proxy_anchor_antico", "proxy_anchor"])
def test_the_default_losses_never_make_the_host_wait(compose_cfg, monkeypatch, loss):
    """On a GPU the step's forward and backward must queue without reading anything back: checked on the
    CPU by the operators the loss dispatches (the range check of the labels runs on CPU tensors only)."""
    import dml.losses.proxy

    monkeypatch.setattr(dml.losses.proxy, "_check_labels", lambda labels, num_classes: None)
    cfg = compose_cfg([f"loss={loss}", "dataset=cub", "dataset.num_train_classes=10"])
    module = instantiate(cfg.loss)
    embeddings = torch.nn.functional.normalize(
        torch.randn(12, cfg.loss.embedding_size), dim=1
    ).requires_grad_()
    labels = torch.tensor([0, 0, 3, 3, 5, 5, 7, 7, 2, 2, 9, 9])
    reads = HostReads()
    with reads:
        out = module(embeddings, labels)
        out["loss"].backward()
    assert reads.found == [], reads.found
