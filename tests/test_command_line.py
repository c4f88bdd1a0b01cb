"""The command line's checks before Hydra runs and its messages at the end (dml.command), in-process."""

from __future__ import annotations

import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dml.command import check_command_line, check_required, force_add, report_failed_jobs
from dml.errors import UserError


@pytest.mark.parametrize(
    "value",
    [
        "/data/фото.jpg",
        "/photos/photo [final] v2.png",
        "/a/b(1).png",
        '/a/ça "va".png',
        "photo(1).png",
        "[final].png",
    ],
)
def test_a_value_hydra_cannot_read_gets_its_quoted_form(value, capsys):
    with pytest.raises(SystemExit) as stopped:
        check_command_line(["k=5", f"query={value}"])
    said = capsys.readouterr().err
    assert stopped.value.code == 2 and "quote it for Hydra" in said
    shell = said.rsplit("which in a shell is ", 1)[1].strip()
    (override,) = OverridesParser.create().parse_overrides(shlex.split(shell))
    assert override.key_or_group == "query" and override.value() == value, (
        "the form given reads back as typed"
    )


def test_values_hydra_reads_or_that_quoting_cannot_mend_pass_to_hydra():
    check_command_line(
        ["query=/data/photo.jpg", "k=abc", "-m", "loss.antico_weight=0.1,1", "query='/d/фото.jpg'"]
    )
    check_command_line(["loss.antico_weight=choice(1,2"])  # a sweep typed wrong: Hydra says what is wrong


def test_missing_values_are_named_with_the_usage_line(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(
        sys.modules,
        "__main__",
        types.SimpleNamespace(__doc__="Search: python search.py index=<dir> query=<q>."),
    )
    cfg = OmegaConf.create({"index": "???", "query": "???", "k": 10, "paths": {"out": "${k}"}})
    with pytest.raises(
        UserError, match=r"^index=, query= must be given: python search.py index=<dir> query=<q>$"
    ):
        check_required(cfg)
    check_required(OmegaConf.create({"index": "x", "query": "y"}))


def test_evaluate_s_stored_dataset_keys_are_force_added():
    argv = [
        "ckpt_path=a.ckpt",
        "dataset.skip_bad_images=true",
        "dataset=cub",
        "+model.x=1",
        "trainer.devices=1",
    ]
    assert force_add(argv, ("dataset", "model")) == [
        "ckpt_path=a.ckpt",
        "++dataset.skip_bad_images=true",
        "dataset=cub",
        "+model.x=1",
        "trainer.devices=1",
    ]


def test_a_sweep_whose_every_job_failed_lists_them(tmp_path, capsys):
    report_failed_jobs(tmp_path)  # none failed: nothing to say
    for job in ("0", "1"):
        (tmp_path / job).mkdir()
        (tmp_path / job / "FAILED").write_text(f"overrides: x={job}\nthe loss is not finite ({job})\n")
    with pytest.raises(SystemExit) as stopped:
        report_failed_jobs(tmp_path, ran=2)
    said = capsys.readouterr().err
    assert stopped.value.code == 1 and "all 2 jobs of the sweep failed" in said
    assert "the loss is not finite (0)" in said and "the loss is not finite (1)" in said
