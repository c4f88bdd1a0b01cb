"""The study behind ``docs/results.md`` (``make study``): every arm of every table trained once per seed,
scored, and written up with its claims' verdicts."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig

from dml.command import check_command_line, fail, user_message
from dml.errors import UserError
from dml.evaluation.pictures import embedding_map
from dml.io import check_folder, write_atomic
from dml.runs import RunStopped
from dml.study.experiments import antico_probe, embed, train_run
from dml.study.pictures import convergence_plot, forest_plot, gradient_plot
from dml.study.report import (
    REPORT_HEAD,
    check_claim,
    check_report_path,
    claims_of,
    compose_study,
    forms_section,
    slug,
    table_section,
)

STUDY_RUN = "study_run.json"  # in each run folder the study finished: the run's overrides
# Every study run: no test pass (each split is scored from the last checkpoint), Recall@1 validated after
# every epoch (NMI and the collapse measures are left to the scoring) and a TrainingRecord.
RUN_SETTINGS = [
    "test=false",
    "callbacks=study",
    "model.nmi=false",
    "model.collapse=false",
    "trainer.check_val_every_n_epoch=1",
]


def _sweep_splits(sweep: DictConfig) -> list[str]:
    """The split or splits a sweep is scored on (``split``: one name or a list)."""
    return list(sweep.split) if isinstance(sweep.split, ListConfig) else [sweep.split]


def run_study(spec: DictConfig, out: Path, runs_dir: Path) -> Path:
    """Train every arm of every table once per seed, score the last checkpoints, write ``out``.

    Returns ``out``: a Markdown report with one table per study table (mean +/- 95% CI over the seeds,
    the paper's numbers beside ours where given), the weights its sweeps chose, its claims' verdicts
    and, for tables that ask, 2-d maps of the first seed.
    """
    check_report_path(out)
    check_folder(runs_dir, "runs")
    started = time.time()
    study = _Study(spec, runs_dir, out.parent / "results")
    sections = [study.table(table) for table in spec.tables]
    if spec.get("forms"):
        sections.append(forms_section(spec.forms.dim, list(spec.forms.classes)))
    minutes = (time.time() - started) / 60
    header = (
        f"{REPORT_HEAD} (`python -m dml.study`) in {minutes:.0f} min: do not edit by hand.\n"
        f"Seeds {list(spec.seeds)}; extra overrides {list(spec.overrides) or 'none'}; each run's last "
        "checkpoint is scored (validation, after every epoch, only draws the convergence pictures). Values: "
        f"mean +/- 95% confidence half-width over the seeds. {os.cpu_count()} CPU cores, torch {torch.__version__}.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, header + "\n" + "\n".join(sections))
    return out


class _Study:
    """Runs and scores a study's arms; identical runs (same overrides) train once."""

    def __init__(self, spec: DictConfig, runs_dir: Path, pictures: Path):
        self.spec, self.runs_dir, self.pictures = spec, runs_dir, pictures
        self.done: dict[tuple[str, ...], tuple[dict[str, float], Path]] = {}
        self.last: dict[tuple[str, int], Path] = {}  # (arm, seed) -> its last checkpoint
        data = [f"paths.data_dir={spec.data_dir}"] if spec.get("data_dir") else []
        self.extra = [*spec.overrides, *data]  # every run's, after its arm's and table's

    def score(self, name: str, overrides: list[str], table: DictConfig, splits, picture: str | None = None):
        """Train ``overrides`` (once), embed each split with the last checkpoint, return its scores;
        ``picture``: also draw the test split's 2-d map under that title."""
        key = tuple(overrides)
        if key not in self.done:
            self.done[key] = ({}, self._train(name, [*overrides, *RUN_SETTINGS]))
        row, last = self.done[key]
        for split in splits:  # a run another table scored already is scored again for what it lacks
            if not all(f"{split}/recall@{k}" in row for k in table.ks) or any(
                f"{split}/nmi+{m}x" not in row for m in table.nmi_multiples
            ):
                scores = embed(last, split).scores(table.ks, table.nmi_multiples)
                row |= {f"{split}/{k}": v for k, v in scores.items()}
        if picture:
            embedded = embed(last, "test")
            embedding_map(
                embedded.embeddings,
                embedded.labels,
                self.pictures / f"{table.name}_{slug(picture)}.png",
                title=f"{picture}: {table.splits.get('test', 'test classes')}, {name.rsplit('/', 1)[-1]}",
                legend_title=table.get("legend", "class"),
            )
        return dict(row)

    def record(self, arm: str, seed: int) -> dict | None:
        """The ``training_record.json`` of an arm's run (None for a run trained without one)."""
        path = self.last[(arm, seed)].parent.parent / "training_record.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _train(self, name: str, overrides: list[str]) -> Path:
        """Train ``overrides`` into ``<runs>/<name>``; returns its last checkpoint. ``study_run.json`` in
        that folder records the run's overrides from before it starts, and that it finished: a finished
        run is used as it is, and an unfinished one goes on from its last checkpoint, so the same command
        with the same ``runs=`` goes on where a stopped study stopped.

        Raises:
            UserError: that folder holds a run of other overrides, one the study did not start, or a
                finished run whose last checkpoint is gone.
        """
        folder = self.runs_dir / name
        marker, last = folder / STUDY_RUN, folder / "checkpoints" / "last.ckpt"
        record = json.loads(marker.read_text()) if marker.is_file() else None
        if record is None and folder.exists() and any(folder.iterdir()):
            raise UserError(
                f"runs={self.runs_dir}: {folder} holds files this study did not write; give the study another "
                f"runs= folder, or delete {folder}"
            )
        if record is not None and record.get("overrides") != overrides:
            raise UserError(
                f"runs={self.runs_dir}: {folder} holds a run of other settings "
                f"({' '.join(record.get('overrides') or [])}); give the study another runs= folder, or delete {folder}"
            )
        if record is not None and record.get("finished"):
            if not last.is_file():
                raise UserError(
                    f"{folder} holds a finished run whose {last.name} is gone; delete {folder} to train it again"
                )
            return last
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps({"overrides": overrides, "finished": False}) + "\n")
        resume = ["ckpt_path=last"] if last.is_file() else []
        run = train_run(name, [*overrides, *resume], self.runs_dir)
        write_atomic(marker, json.dumps({"overrides": overrides, "finished": True}) + "\n")
        return run.output_dir / "checkpoints" / "last.ckpt"

    def sweep(self, table: DictConfig, arm: DictConfig) -> tuple[float, dict[float, float]]:
        """(chosen value, value -> validation score) of ``table.sweep`` for this arm's overrides."""
        sweep = table.sweep
        splits = _sweep_splits(sweep)  # scored by their mean
        own = arm.sweep if isinstance(arm.sweep, ListConfig) else None
        values = self.spec.get("sweep_values") or own or sweep["values"]
        found = {}
        for value in values:
            overrides = [
                *arm.overrides,
                *table.common,
                *sweep.overrides,
                *self.extra,
                f"{sweep.key}={value}",
                f"seed={sweep.seed}",
            ]
            name = f"{table.name}/sweep/{slug(arm.name)}/{sweep.key}={value}/seed{sweep.seed}"
            row = self.score(name, overrides, table, splits)
            found[float(value)] = float(np.mean([row[f"{split}/{sweep.score}"] for split in splits]))
        # a run whose score is not a number (it diverged) is never the one chosen
        return max(found, key=lambda v: -np.inf if np.isnan(found[v]) else found[v]), found

    def probe(self, table: DictConfig, arms: list, names: dict[str, str]) -> str:
        """The AntiCo term of each arm that has one, at the end of its first seed's run."""
        lines = [
            f"\nThe AntiCo term after training (seed {self.spec.seeds[0]}, last checkpoint, one batch of every "
            "training class x 10 images; the term unweighted, exp(-R) in the official form; the gradients "
            "of the weighted term):\n",
            "| arm | variant | weight | term | R | gradient to the embeddings | gradient to the proxies |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for arm in arms:
            last = self.last.get((arm.name, self.spec.seeds[0]))
            found = antico_probe(last) if last is not None else None
            if found:
                lines.append(
                    f"| {names[arm.name]} | {found['variant']} | {found['weight']:g} | {found['value']:.3g} "
                    f"| {found['rate']:.3g} "
                    f"| {found['embedding_grad']:.3g} | {found['proxy_grad']:.3g} |"
                )
        return "\n".join(lines) + "\n"

    def pictures_of(self, table: DictConfig, arms: list, names: dict[str, str]) -> str:
        """The table's convergence picture and, when an arm has an AntiCo term, its gradient picture."""
        records = {
            names[a.name]: found
            for a in arms
            if (found := [r for seed in self.spec.seeds if (r := self.record(a.name, seed))])
        }
        if not records:
            return ""
        text = (
            f"\nConvergence: validation {next(iter(records.values()))[0]['metric']} ({table.get('validation', 'the test split')}) "
            "after each epoch, against epochs and against training time; mean over the seeds, 95% interval shaded.\n\n"
        )
        convergence_plot(records, self.pictures / f"{table.name}_convergence.png", table.title)
        text += f"![convergence](results/{table.name}_convergence.png)\n"
        if any(g["term"] == "antico" for runs in records.values() for r in runs for g in r["gradients"]):
            gradient_plot(records, self.pictures / f"{table.name}_gradients.png", table.title)
            text += (
                "\nThe gradient each part of the loss sent (its weighted value's gradient norm, to the batch embeddings "
                "and to the proxies, each bar on its own), at the first step, the middle step and the last step of "
                "training; median over the seeds:\n\n"
                f"![gradients](results/{table.name}_gradients.png)\n"
            )
        return text

    def table(self, table: DictConfig) -> str:
        arms, names, notes = list(table.arms)[: self.spec.max_arms or None], {}, []
        scores: dict[str, list[dict[str, float]]] = {}
        for arm in arms:
            overrides = list(arm.overrides)
            names[arm.name] = arm.name
            if arm.get("sweep"):
                best, found = self.sweep(table, arm)
                overrides.append(f"{table.sweep.key}={best}")
                names[arm.name] = f"{arm.name} {best:g}"
                tried = ", ".join(f"{v:g}: {s:.3f}" for v, s in found.items())
                notes.append(f"- {arm.name}: {tried} -> {best:g}")
            for seed in self.spec.seeds:
                picture = names[arm.name] if table.pictures and seed == self.spec.seeds[0] else None
                run = [*overrides, *table.common, *self.extra, f"seed={seed}"]
                name = f"{table.name}/{slug(names[arm.name])}/seed{seed}"
                scores.setdefault(arm.name, []).append(self.score(name, run, table, table.splits, picture))
                self.last[(arm.name, seed)] = self.done[tuple(run)][1]
        text = table_section(table, arms, names, scores)
        if notes:
            sweep = table.sweep
            where = " and ".join(_sweep_splits(sweep))
            text += f"\n{sweep.description} ({sweep.key}; {where} {sweep.score} by value):\n\n"
            text += "\n".join(notes) + "\n"
        checked = [c for c in (check_claim(claim, scores) for claim in claims_of(table, arms)) if c]
        if checked:
            text += (
                "\nClaims (difference of means, Welch 95% interval; 'not separated' when it spans 0). Each "
                f"interval is at 95% on its own: of these {len(checked)}, about {len(checked) / 20:.1f} would "
                "come out held or did not hold by chance alone if no arm differed from its baseline.\n\n"
            )
            text += "\n".join(c.line() for c in checked) + "\n"
            forest_plot(checked, self.pictures / f"{table.name}_claims.png", f"{table.title}: claims")
            text += f"\n![claims of this table](results/{table.name}_claims.png)\n"
        text += self.pictures_of(table, arms, names)
        if table.get("probe"):
            text += self.probe(table, arms, names)
        return text


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dml.study [study=full|quick] [out=docs/results.md] [runs=logs/study/<time>]``: Hydra
    overrides of ``conf/study.yaml``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_command_line(argv)
    try:
        cfg, name = compose_study(argv)
    except UserError as e:
        fail(user_message(e))
    options = {"study": name, "out": str(cfg.out), "runs": str(cfg.runs)}
    runs = Path(options["runs"])
    try:
        out = run_study(cfg.study, Path(options["out"]), runs)
    except (KeyboardInterrupt, RunStopped) as e:
        again = " ".join(f"{k}={v}" for k, v in options.items() if k != "runs")
        fail(
            f"the study was stopped before its report was written; the runs it finished are kept in {runs}. "
            f'Go on from them with: python -m dml.study {again} runs={runs}  (make study ARGS="{again} runs={runs}")',
            getattr(e, "exit_code", 130),
        )
    except UserError as e:
        fail(user_message(e))
    print(f"wrote {out}")  # noqa: T201 - the command's result


if __name__ == "__main__":
    main()
