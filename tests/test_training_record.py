"""TrainingRecord (callbacks=study): the convergence and per-term gradient record of a run."""

import json

import pytest
import torch

from dml.checkpoints import load_checkpoint
from dml.study import train_run

RUN = [
    "experiment=synthetic_smoke",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "loss=triplet_antico",
    "loss.terms.antico.loss.form=neg",
    "callbacks=study",
    "test=false",
    "seed=3",
]


def record_of(tmp_path, name, *overrides):
    run = train_run(name, [*RUN, *overrides], tmp_path)
    return run, json.loads((run.output_dir / "training_record.json").read_text())


def test_record_has_each_validation_and_each_term_s_gradient_without_changing_training(tmp_path):
    run, record = record_of(tmp_path, "every", "callbacks.training_record.gradient_every=1")
    epochs = record["epochs"]
    assert record["metric"] == "val/recall@1" and [e["epoch"] for e in epochs] == [1, 2]
    assert 0 < epochs[0]["seconds"] < epochs[1]["seconds"] and epochs[1]["step"] > epochs[0]["step"]
    assert epochs[1]["val/recall@1"] == pytest.approx(run.metrics["val/recall@1"])
    steps = epochs[1]["step"]
    by_term = {t: [g for g in record["gradients"] if g["term"] == t] for t in ("triplet", "antico")}
    assert [g["step"] for g in by_term["antico"]] == list(range(steps))
    assert all(g["embeddings"] > 0 and g["proxies"] == 0 for g in by_term["antico"])
    # measuring takes a backward pass through the loss only: the weights trained are the same bits
    plain, _ = record_of(tmp_path, "none", "callbacks.training_record.gradient_every=0")
    a, b = load_checkpoint(run.checkpoint).state_dict, load_checkpoint(plain.checkpoint).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_norm_is_the_weighted_term_s(tmp_path):
    """At the first step (same batch, same initial weights) doubling the AntiCo weight doubles its
    recorded gradient and leaves the base term's alone; the first and last steps are always measured."""
    _, one = record_of(
        tmp_path, "w1", "loss.antico_weight=1.0", "callbacks.training_record.gradient_every=1000"
    )
    _, two = record_of(
        tmp_path, "w2", "loss.antico_weight=2.0", "callbacks.training_record.gradient_every=1000"
    )
    first = [{g["term"]: g for g in r["gradients"] if g["step"] == 0} for r in (one, two)]
    assert first[1]["antico"]["embeddings"] == pytest.approx(2 * first[0]["antico"]["embeddings"], rel=1e-5)
    assert first[1]["triplet"]["embeddings"] == pytest.approx(first[0]["triplet"]["embeddings"], rel=1e-5)
    assert first[1]["antico"]["value"] == pytest.approx(first[0]["antico"]["value"], rel=1e-5)
    assert sorted({g["step"] for g in one["gradients"]}) == [0, one["epochs"][-1]["step"] - 1]


@pytest.mark.slow  # three short trainings, one stopped
def test_record_goes_on_after_a_resume(tmp_path):
    """The record is the callback's checkpoint state: a run stopped in its second epoch and resumed from
    last.ckpt keeps the first epoch's row and gradients and appends its own, its clock going on."""
    from dml.runs import RunStopped

    _, whole = record_of(tmp_path, "whole")
    per_epoch = whole["epochs"][0]["step"]
    stop = ["+callbacks.stop._target_=tests.crash.SignalAtStep", f"+callbacks.stop.step={per_epoch + 1}"]
    with pytest.raises(RunStopped):
        record_of(tmp_path, "r", *stop, "+callbacks.stop.signal=SIGTERM")
    checkpoint = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = (v for k, v in checkpoint["callbacks"].items() if "TrainingRecord" in k)
    assert [e["epoch"] for e in state["epochs"]] == [1] and state["seconds"] > 0
    _, record = record_of(tmp_path, "r", "ckpt_path=last")
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["epochs"][0] == state["epochs"][0] and record["epochs"][1]["seconds"] > state["seconds"]
    assert [g["step"] for g in record["gradients"]] == [g["step"] for g in whole["gradients"]]
