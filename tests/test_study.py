"""The study behind docs/results.md (make study): its quick variant end to end, the report's structure."""

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from scipy.stats import ttest_ind

from dml.errors import UserError
from dml.runs import RunStopped
from dml.study import difference_ci, load_spec, main, mean_and_ci, run_study, train_run
from dml.study.report import claims_of
from tests.conftest import ROOT

CELL = r"-?\d+\.\d{3} \+/- (\d+\.\d{3}|nan)"


def test_mean_and_confidence_half_width():
    mean, half = mean_and_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)


def test_difference_interval_is_welch():
    a, b = [0.5, 0.6, 0.7], [0.2, 0.4, 0.0]
    reference = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)  # dof 2.94
    assert difference_ci(a, b) == pytest.approx((0.4, reference.low, reference.high))
    assert reference.low < 0 < reference.high  # this pair is "not separated"
    assert difference_ci([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)


def tables_of(section: str) -> list[list[str]]:
    """The Markdown tables of a report section, each as its rows (header and rule left out)."""
    found, rows = [], []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            found.append(rows[2:])
            rows = []
    return found


PICTURES = r"^!\[.*\]\((results/.*\.png)\)$"


def check_report(out: Path, spec) -> dict[str, str]:
    """The report at ``out`` has what ``spec`` declares: per table, one Markdown table per split with a row
    per arm (swept arms named with their value) of mean +/- CI cells, the paper's rows, a verdict per
    claim and their forest plot, the convergence picture, the gradient picture where an arm has an AntiCo
    term, and the 2-d maps; then the AntiCo forms where the spec has them. Returns the sections by table
    name (and "forms")."""
    text = out.read_text()
    seeds = re.search(r"^Seeds \[([\d, ]+)\]; extra overrides (.*?); ", text, re.M)
    assert seeds and [int(x) for x in seeds[1].split(", ")] == list(spec.seeds), "seeds line"
    assert seeds[2] == (str(list(spec.overrides)) if spec.overrides else "none")
    sections = text.split("\n## ")[1:]
    assert len(sections) == len(spec.tables) + bool(spec.get("forms")), "a section per table, then the forms"
    for table, section in zip(spec.tables, sections, strict=False):
        assert section.startswith(table.title)
        if table.get("notes"):
            assert " ".join(table.notes.split()) in section
        arms = list(table.arms)[: spec.max_arms or None]
        with_term = [a for a in arms if any("antico" in o for o in a.overrides)]
        section, _, probe = section.partition("\nThe AntiCo term after training")
        if table.get("probe"):  # a row per arm with an AntiCo term: variant, weight, term, R, gradients
            (rows,) = tables_of(probe)
            assert len(rows) == len(with_term) and all(len(r.strip("| ").split(" | ")) == 7 for r in rows), (
                rows
            )
            assert all(r.split(" | ")[1] in ("pair", "batch_proxy", "all_proxy") for r in rows), rows
        found = tables_of(section)
        assert len(found) == len(table.splits), "one Markdown table per split"
        for split, rows in zip(table.splits, found, strict=True):
            expected = []  # (is the paper's row, pattern)
            for arm in arms:
                expected.append((False, re.escape(arm.name) + (r" \d+(\.\d+)?" if arm.get("sweep") else "")))
                if arm.get("paper"):
                    keys = [f"{split}/{column}" for column in table.columns]
                    paper = [f"{arm.paper[k]:.3f}" if k in arm.paper else "" for k in keys]
                    expected.append((True, f"| {arm.name} (paper) | " + " | ".join(paper) + " |"))
            assert len(rows) == len(expected), rows
            for row, (paper, pattern) in zip(rows, expected, strict=True):
                if paper:
                    assert row == pattern
                    continue
                name, *cells = row.strip("| ").split(" | ")
                assert re.fullmatch(pattern, name), (name, pattern)
                assert len(cells) == len(table.columns) and all(re.fullmatch(CELL, c) for c in cells), cells
        claims = claims_of(table, arms)
        verdicts = re.findall(r"^- (.*): \*\*(held|did not hold|not separated)\*\* \((\S+) ", section, re.M)
        assert [(v[0], v[2]) for v in verdicts] == [(c.text, c.metric) for c in claims] and claims
        pictures = re.findall(PICTURES, section, re.M)
        assert all((out.parent / picture).is_file() for picture in pictures), pictures
        kinds = {"claims": 1, "convergence": 1, "gradients": 1 if with_term else 0}
        for kind, count in kinds.items():
            assert pictures.count(f"results/{table.name}_{kind}.png") == count, (kind, pictures)
        maps = [p for p in pictures if not p.endswith(tuple(f"_{k}.png" for k in kinds))]
        assert len(maps) == (len(arms) if table.pictures else 0)
        assert "Convergence: validation val/recall@1" in section
    if spec.get("forms"):
        forms = sections[-1]
        assert re.search(r"^\| 11,318 \| 1756\.\d\d \| 0 \| 0 \| \d", forms, re.M), forms
    return {**{t.name: s for t, s in zip(spec.tables, sections, strict=False)}, "forms": sections[-1]}


def test_committed_results_are_the_full_study_s_output():
    """docs/results.md was written by make study from today's conf/study/full.yaml: at least 5 seeds, no
    extra overrides, every arm, claim and picture the spec declares, in under 90 minutes."""
    out = ROOT / "docs" / "results.md"
    spec = load_spec("full")
    assert len(spec.seeds) >= 5 and not spec.overrides and not spec.max_arms
    check_report(out, spec)
    minutes = re.search(
        r"^Generated by `make study` \(`python -m dml.study`\) in (\d+) min", out.read_text(), re.M
    )
    assert minutes and int(minutes[1]) < 90


@pytest.mark.slow  # about twenty one-epoch trainings
def test_quick_study_writes_tables_sweeps_claims_paper_numbers_and_pictures(tmp_path):
    out = tmp_path / "docs" / "results.md"
    main(["study=quick", f"out={out}", f"runs={tmp_path / 'runs'}"])
    sections = check_report(out, load_spec("quick"))
    eps, sphere = sections["eps"], sections["antico_sphere"]
    assert "| triplet (paper) | 0.420 | 0.875 | 0.966 |" in eps  # train digits
    assert "| triplet (paper) | 0.352 | 0.809 | 0.933 |" in eps  # test digits
    for arm in ("triplet", "triplet_eps", "triplet_eps_random_negatives"):
        assert f"(results/eps_{arm}.png)" in eps
    # the swept arm: each value tried on the sweep's split, the best one named in its row
    tried = re.search(r"^- triplet \+ AntiCo -R: 0\.1: (\S+), 1: (\S+) -> (\S+)$", sphere, re.M)
    assert tried, sphere
    scores = {"0.1": float(tried[1]), "1": float(tried[2])}
    best = max(scores, key=scores.get) if scores["0.1"] != scores["1"] else tried[3]  # a tie at 3 decimals
    assert tried[3] == best and f"| triplet + AntiCo -R {best} | " in sphere
    sweeps = tmp_path / "runs" / "antico_sphere" / "sweep"
    assert len(list(sweeps.glob("*/*/seed0/checkpoints/last.ckpt"))) == 4  # 2 arms x 2 values
    # the plane table's triplet is the EPS table's run (the same settings train once)
    assert not (tmp_path / "runs" / "antico_plane" / "triplet").exists()
    # each run recorded its convergence and its terms' gradients
    (path,) = (tmp_path / "runs" / "antico_sphere").glob("triplet_antico_r_*/seed1/training_record.json")
    record = json.loads(path.read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1] and record["metric"] == "val/recall@1"
    assert {g["term"] for g in record["gradients"]} == {"triplet", "antico"}


# --- bad input and stops (issue 27, case 5) ---------------------------------------------------------------


def one_run_spec():
    """A study of one table, one arm, one seed: a one-epoch synthetic run."""
    arm = {
        "name": "smoke",
        "overrides": ["experiment=synthetic_smoke", "trainer.max_epochs=1", "trainer.accelerator=cpu"],
    }
    table = {
        "name": "t",
        "title": "One arm",
        "common": [],
        "splits": {"test": "test classes"},
        "ks": [1],
        "nmi_multiples": [],
        "columns": ["recall@1"],
        "pictures": False,
        "arms": [arm],
    }
    return OmegaConf.create(
        {"seeds": [1], "overrides": [], "max_arms": None, "sweep_values": None, "tables": [table]}
    )


def test_a_finished_study_s_runs_are_used_again_and_a_stopped_one_goes_on(tmp_path, monkeypatch):
    import dml.study.runner as runner

    out, runs = tmp_path / "results.md", tmp_path / "runs"
    run_study(one_run_spec(), out, runs)
    first = out.read_text().split("\n", 3)[3]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "train_run", no_training)
    run_study(one_run_spec(), out, runs)
    assert out.read_text().split("\n", 3)[3] == first, "the same runs, the same report"

    marker = runs / "t" / "smoke" / "seed1" / "study_run.json"
    marker.write_text(marker.read_text().replace('"finished": true', '"finished": false'))  # as if stopped
    resumed = []
    monkeypatch.setattr(
        runner,
        "train_run",
        lambda name, overrides, d: resumed.append(overrides) or train_run(name, overrides, d),
    )
    run_study(one_run_spec(), out, runs)
    assert resumed and resumed[0][-1] == "ckpt_path=last"

    other = one_run_spec()
    other.tables[0].arms[0].overrides.append("seed=3")  # another run under the same name
    with pytest.raises(
        UserError, match=r"runs=.* holds a run of other settings .* give the study another runs= folder"
    ):
        run_study(other, out, runs)
    marker.unlink()  # a folder this study did not start
    with pytest.raises(UserError, match=r"holds files this study did not write"):
        run_study(one_run_spec(), out, runs)


@pytest.mark.parametrize("what", ["folder", "other file"])
def test_a_report_path_that_cannot_take_the_report_is_refused_before_training(
    tmp_path, monkeypatch, capsys, what
):
    import dml.study.runner as runner

    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained before the refusal"))
    out = tmp_path / "report"
    out.mkdir() if what == "folder" else out.write_text("# my notes\n")
    with pytest.raises(SystemExit) as stopped:
        main(["study=quick", f"out={out}", f"runs={tmp_path / 'runs'}"])
    said = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in said
    assert (
        "is a folder; give the report's file" if what == "folder" else "is not a report written by make study"
    ) in said
    assert out.is_dir() if what == "folder" else out.read_text() == "# my notes\n"


@pytest.mark.parametrize(
    "stop, code", [(KeyboardInterrupt(), 130), (RunStopped("training was stopped by SIGTERM", 143), 143)]
)
def test_a_stopped_study_is_one_message_with_the_command_that_goes_on(
    tmp_path, monkeypatch, capsys, stop, code
):
    import dml.study.runner as runner

    def stopped(*args):
        raise stop

    monkeypatch.setattr(runner, "run_study", stopped)
    with pytest.raises(SystemExit) as exit_:
        main(["study=quick", f"runs={tmp_path / 'runs'}"])
    said = capsys.readouterr().err
    assert exit_.value.code == code and "Traceback" not in said
    assert (
        f"Go on from them with: python -m dml.study study=quick out=logs/study/quick/results.md runs={tmp_path / 'runs'}"
        in said
    )


@pytest.mark.parametrize(
    "argument, said",
    [("studdy=quick", "Could not override 'studdy'"), ("study=nope", "Could not find 'study/nope'")],
)
def test_a_bad_study_argument_is_one_message_with_the_usage(capsys, argument, said):
    with pytest.raises(SystemExit) as stopped:
        main([argument])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and said in err and "Traceback" not in err
    assert (
        "usage: python -m dml.study [study=<cars_antico|cub_antico|cub_antico_quick|full|quick>] [out=<report>] [runs=<folder>]"
        in err
    )
