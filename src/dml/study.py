"""Small-scale studies: train a few configs, embed, compare collapse (the notebooks), and the study
behind ``docs/results.md`` (``make study``: ``python -m dml.study [study=quick]``)."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import t as t_dist

from dml.config import compose, conf_dir
from dml.errors import UserError
from dml.evaluation import collapse_metrics, knn, retrieval_metrics, singular_values
from dml.evaluation.pictures import embedding_map, split_retrievals
from dml.functional import coding_rate
from dml.inference import Embedder
from dml.losses import AntiCoLoss, ProxyBank
from dml.runs import write_atomic
from dml.tasks import build_data_and_module, load_checkpoint, train


@dataclass
class Run:
    """A finished training run: its config, test metrics, best checkpoint and output folder."""

    name: str
    cfg: DictConfig
    metrics: dict[str, float]
    checkpoint: Path
    output_dir: Path


@dataclass
class Embedded:
    """One split embedded by a checkpoint, in dataset order."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    split: object
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    metric: str = "cosine"  # euclidean for un-normalised embeddings (head.normalize=false)

    def collapse(self) -> dict[str, float]:
        return collapse_metrics(self.embeddings, self.labels)

    def spectrum(self) -> torch.Tensor:
        return singular_values(self.embeddings)

    def nearest(self) -> torch.Tensor:
        """Each item's nearest other item (position in the split)."""
        if self.metric == "euclidean":
            return torch.cdist(self.embeddings, self.embeddings).fill_diagonal_(float("inf")).argmin(1)
        return knn(self.embeddings, k=1, backend="torch")[:, 0]

    def scores(self, ks: Sequence[int] = (1, 5, 10), nmi_multiples: Sequence[int] = ()) -> dict[str, float]:
        """Recall@K, MAP@R, R-Precision, NMI (and NMI+) and the collapse measures of this split."""
        metrics = retrieval_metrics(
            self.embeddings, self.labels, ks=ks, metric=self.metric, nmi_multiples=nmi_multiples
        )
        return metrics | collapse_metrics(self.embeddings, self.labels)

    def recall_at_1_by_class(self) -> dict[int, tuple[int, float]]:
        """class -> (number of queries, their Recall@1)."""
        hit = self.labels[self.nearest()] == self.labels
        return {
            int(c): (int((self.labels == c).sum()), hit[self.labels == c].float().mean().item())
            for c in torch.unique(self.labels)
        }

    def hardest_queries(self, count: int = 6) -> torch.Tensor:
        """Positions of the first ``count`` items whose nearest neighbour is of another class."""
        return torch.nonzero(self.labels[self.nearest()] != self.labels).flatten()[:count]

    def retrievals_picture(self, queries: torch.Tensor, path: str | Path, top_k: int = 5) -> Path:
        """The queries and their ``top_k`` nearest items, wrong ones framed in red."""
        return split_retrievals(
            self.embeddings,
            self.labels,
            self.split.roles,
            self.split.raw_image,
            queries,
            path,
            top_k,
            self.metric,
        )


QUIET = ["callbacks=no_progress", "trainer.enable_progress_bar=false", "~logger"]


def train_run(name: str, overrides: Sequence[str], output_dir: str | Path) -> Run:
    """Train one config (as ``train.py`` would, quietly) into ``output_dir/name``."""
    cfg = compose([*QUIET, *overrides], output_dir=Path(output_dir) / name)
    metrics = train(cfg)
    best = sorted((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    return Run(name, cfg, metrics, best[-1], Path(cfg.paths.output_dir))


def embed(checkpoint: str | Path, split: str = "test", batch_size: int = 500) -> Embedded:
    """Embed a split (``train``, ``val``, ``heldout`` or ``test``) with a checkpoint written by ``train.py``."""
    embedder = Embedder.from_checkpoint(checkpoint, device="cpu")
    out = embedder.embed_split(split, batch_size=batch_size, progress=False)
    data = embedder.datamodule.splits[split]
    return Embedded(out.vectors, out.labels, data, dict(data.extra_labels), embedder.metric)


def antico_probe(
    checkpoint: str | Path, samples_per_class: int = 10, seed: int = 0
) -> dict[str, float] | None:
    """The AntiCo term of a trained checkpoint on one class-balanced batch of its training split (every
    training class, ``samples_per_class`` images each, drawn with ``seed``): its variant, weight, value
    (exp(-R) in the official form, unweighted), R, and the gradient norm the weighted term sends to the
    embeddings and to the proxies. ``None`` when the run's loss has no AntiCo term."""
    run_cfg, state_dict = load_checkpoint(Path(checkpoint))
    datamodule, module = build_data_and_module(run_cfg)
    module.load_state_dict(state_dict)
    module.eval()
    term = module.loss.terms["antico"].loss if "antico" in module.loss.terms else None
    if term is None:
        return None
    datamodule.setup("fit")
    data = datamodule.splits["train"]
    g = torch.Generator().manual_seed(seed)
    picks = [
        members[torch.randperm(len(members), generator=g)[:samples_per_class]]
        for members in (torch.nonzero(data.labels == c).flatten() for c in torch.unique(data.labels))
    ]
    index = torch.cat(picks)
    with torch.no_grad():
        embeddings = module(torch.stack([data[int(i)][0] for i in index]))
    embeddings.requires_grad_()
    labels = data.labels[index]
    module.loss.zero_grad()
    weight = float(module.loss.weights["antico"])
    value = term(embeddings, labels)
    (weight * value).backward()
    proxies = term.proxies.weight.grad if term.proxies is not None else None
    return {
        "variant": term.variant,
        "weight": weight,
        "value": value.item(),
        "rate": (-value.log() / term.gamma).item() if term.form == "exp" else (-value / term.gamma).item(),
        "embedding_grad": embeddings.grad.norm().item() if embeddings.grad is not None else 0.0,
        "proxy_grad": proxies.norm().item() if proxies is not None else 0.0,
    }


# --- the study behind docs/results.md (make study) ------------------------------------------------------


def load_spec(name: str) -> DictConfig:
    """``conf/study/<name>.yaml``, merged over the study it names as its ``base``."""
    path = conf_dir() / "study" / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"study={name}: no {path}; choose one of {choices}")
    spec = OmegaConf.load(path)
    if "base" in spec:
        spec = OmegaConf.merge(load_spec(spec.base), {k: v for k, v in spec.items() if k != "base"})
    return spec


def mean_and_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (Student's t over the runs); NaN half-width for one run."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(t_dist.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_study(spec: DictConfig, out: Path, runs_dir: Path) -> Path:
    """Train every arm of every table once per seed, score the last checkpoints, write ``out``.

    Returns ``out``: a Markdown report with one table per study table (mean +/- 95% CI over the seeds,
    the paper's numbers beside ours where given), the weights its sweeps chose, its claims' verdicts
    and, for tables that ask, 2-d maps of the first seed.
    """
    started = time.time()
    study = _Study(spec, runs_dir, out.parent / "results")
    sections = [study.table(table) for table in spec.tables]
    if spec.get("forms"):
        sections.append(_forms_section(spec.forms.dim, list(spec.forms.classes)))
    minutes = (time.time() - started) / 60
    header = (
        "# Results\n\n"
        f"Generated by `make study` (`python -m dml.study`) in {minutes:.0f} min: do not edit by hand.\n"
        f"Seeds {list(spec.seeds)}; extra overrides {list(spec.overrides) or 'none'}; each run's last "
        "checkpoint is scored (runs validate once, after their last epoch). Values: mean +/- 95% confidence "
        f"half-width over the seeds. {os.cpu_count()} CPU cores, torch {torch.__version__}.\n"
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

    def score(self, name: str, overrides: list[str], table: DictConfig, splits, picture: str | None = None):
        """Train ``overrides`` (once), embed each split with the last checkpoint, return its scores;
        ``picture``: also draw the test split's 2-d map under that title."""
        key = tuple(overrides)
        if key not in self.done:
            quick = ["test=false", "trainer.check_val_every_n_epoch=${trainer.max_epochs}"]
            run = train_run(name, [*overrides, *quick], self.runs_dir)
            last = run.output_dir / "checkpoints" / "last.ckpt"
            row = {}
            for split in splits:
                scores = embed(last, split).scores(table.ks, table.nmi_multiples)
                row |= {f"{split}/{k}": v for k, v in scores.items()}
            self.done[key] = (row, last)
        row, last = self.done[key]
        if picture:
            embedded = embed(last, "test")
            embedding_map(
                embedded.embeddings,
                embedded.labels,
                self.pictures / f"{table.name}_{_slug(picture)}.png",
                title=f"{picture}: test digits, {name.rsplit('/', 1)[-1]}",
            )
        return row

    def sweep(self, table: DictConfig, arm: DictConfig) -> tuple[float, dict[float, float]]:
        """(chosen value, value -> validation score) of ``table.sweep`` for this arm's overrides."""
        sweep = table.sweep
        values = self.spec.get("sweep_values") or sweep["values"]
        found = {}
        for value in values:
            overrides = [
                *arm.overrides,
                *table.common,
                *sweep.overrides,
                *self.spec.overrides,
                f"{sweep.key}={value}",
                f"seed={sweep.seed}",
            ]
            name = f"{table.name}/sweep/{_slug(arm.name)}/{sweep.key}={value}/seed{sweep.seed}"
            found[float(value)] = self.score(name, overrides, table, [sweep.split])[
                f"{sweep.split}/{sweep.score}"
            ]
        return max(found, key=found.get), found

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
                run = [*overrides, *table.common, *self.spec.overrides, f"seed={seed}"]
                name = f"{table.name}/{_slug(names[arm.name])}/seed{seed}"
                scores.setdefault(arm.name, []).append(self.score(name, run, table, table.splits, picture))
                self.last[(arm.name, seed)] = self.done[tuple(run)][1]
        text = _section(table, arms, names, scores)
        if notes:
            sweep = table.sweep
            text += f"\n{sweep.description} ({sweep.key}; {sweep.split} {sweep.score} by value):\n\n"
            text += "\n".join(notes) + "\n"
        verdicts = [_verdict(claim, scores) for claim in table.get("claims", [])]
        verdicts = [v for v in verdicts if v]
        if verdicts:
            text += "\nClaims (difference of means, Welch 95% interval; 'not separated' when it spans 0):\n\n"
            text += "\n".join(verdicts) + "\n"
        if table.get("probe"):
            text += self.probe(table, arms, names)
        return text


def difference_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch 95% interval (low, high); NaN bounds with fewer than 2 runs each."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return diff, float("nan"), float("nan")
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = np.sqrt(vx + vy)
    if se == 0:
        return diff, diff, diff
    dof = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = float(t_dist.ppf(0.975, dof) * se)
    return diff, diff - half, diff + half


def _verdict(claim: DictConfig, scores: dict[str, list[dict[str, float]]]) -> str | None:
    """'- <claim>: held | did not hold | not separated (difference ...)' or None if an arm did not run."""
    if claim.better not in scores or claim.than not in scores:
        return None
    diff, low, high = difference_ci(
        [row[claim.metric] for row in scores[claim.better]], [row[claim.metric] for row in scores[claim.than]]
    )
    verdict = "held" if low > 0 else "did not hold" if high < 0 else "not separated"
    return f"- {claim.text}: **{verdict}** ({claim.metric} {diff:+.3f}, interval [{low:+.3f}, {high:+.3f}])"


def antico_form_gradients(
    dim: int = 512, classes: Sequence[int] = (100, 1000, 11_318)
) -> list[dict[str, float]]:
    """All-proxy AntiCo on C random unit proxies (eps 0.5, official scale C / (d eps), float32), per C:
    the coding rate R, exp(-R) and the gradient norm (w.r.t. the proxies) of each form, exp(-R) and -R."""
    rows = []
    for count in classes:
        torch.manual_seed(0)
        bank = ProxyBank(count, dim)
        row = {"classes": count}
        for form in ("exp", "neg"):
            bank.weight.grad = None
            value = AntiCoLoss("all_proxy", proxies=bank, form=form)(torch.empty(0, dim), torch.empty(0))
            value.backward()
            row |= {f"{form}_value": value.item(), f"{form}_grad": bank.weight.grad.norm().item()}
        row["rate"] = coding_rate(bank.normalized().detach(), eps=0.5, scale="official").item()
        rows.append(row)
    return rows


def _forms_section(dim: int, classes: list[int]) -> str:
    lines = [
        "## AntiCo's official form exp(-R) against -R as the number of proxies grows\n",
        f"All-proxy AntiCo on C random unit proxies in {dim}-d (eps 0.5, official scale C / (d eps), float32): "
        "the gradient norm with respect to the proxies.\n",
        "| C | R | exp(-R) | gradient of exp(-R) | gradient of -R |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in antico_form_gradients(dim, classes):
        lines.append(
            f"| {row['classes']:,} | {row['rate']:.2f} | {row['exp_value']:.3g} | {row['exp_grad']:.3g} "
            f"| {row['neg_grad']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def _section(
    table: DictConfig, arms: list, names: dict[str, str], scores: dict[str, list[dict[str, float]]]
) -> str:
    """The table's title and one Markdown table per split: an arm per row (the paper's row under it)."""
    lines = [f"## {table.title}\n"]
    if table.get("notes"):
        lines.append(" ".join(table.notes.split()) + "\n")
    for split, caption in table.splits.items():
        keys = [f"{split}/{column}" for column in table.columns]
        if len(table.splits) > 1:
            lines.append(f"{caption}:\n")
        lines += ["| arm | " + " | ".join(table.columns) + " |", "|---" * (len(keys) + 1) + "|"]
        for arm in arms:
            cells = [
                "{:.3f} +/- {:.3f}".format(*mean_and_ci([row[key] for row in scores[arm.name]]))
                for key in keys
            ]
            lines.append(f"| {names[arm.name]} | " + " | ".join(cells) + " |")
            if arm.get("paper"):
                paper = [f"{arm.paper[k]:.3f}" if k in arm.paper else "" for k in keys]
                lines.append(f"| {arm.name} (paper) | " + " | ".join(paper) + " |")
        lines.append("")
    if table.pictures:
        lines += [f"![{names[a.name]}](results/{table.name}_{_slug(names[a.name])}.png)" for a in arms]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dml.study [study=full|quick] [out=docs/results.md] [runs=logs/study/<time>]``."""
    options = {
        "study": "full",
        "out": "docs/results.md",
        "runs": f"logs/study/{time.strftime('%Y-%m-%d_%H-%M-%S')}",
    }
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, value = arg.partition("=")
        if key not in options or not value:
            sys.exit(f"error: unknown argument {arg!r}; use " + " ".join(f"{k}=<{k}>" for k in options))
        options[key] = value
    try:
        out = run_study(load_spec(options["study"]), Path(options["out"]), Path(options["runs"]))
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")  # noqa: T201 - the command's result


if __name__ == "__main__":
    main()
