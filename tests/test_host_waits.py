"""The training step leaves the device alone: the loss's finiteness is read from a copy made after the
forward pass, and the progress bar reads the logged metrics only every log_every_n_steps batches."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

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


def test_the_progress_bar_reads_the_metrics_every_log_every_n_steps_batches(compose_cfg, monkeypatch, tmp_path):
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
