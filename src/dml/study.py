"""Small-scale studies: train a few configs, embed, compare collapse (the notebooks), and the study
behind ``docs/results.md`` (``make study``: ``python -m dml.study [study=quick]``)."""

from __future__ import annotations

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


@torch.no_grad()
def embed(checkpoint: str | Path, split: str = "test", batch_size: int = 500) -> Embedded:
    """Embed a split (``train``, ``val``, ``heldout`` or ``test``) with a checkpoint written by ``train.py``."""
    run_cfg, state_dict = load_checkpoint(Path(checkpoint))
    datamodule, module = build_data_and_module(run_cfg)
    module.load_state_dict(state_dict)
    module.eval()
    datamodule.setup("test")
    data = datamodule.splits[split]
    outputs = []
    for start in range(0, len(data), batch_size):
        images = torch.stack([data[i][0] for i in range(start, min(start + batch_size, len(data)))])
        outputs.append(module(images))
    return Embedded(torch.cat(outputs), data.labels.clone(), data, dict(data.extra_labels), module.metric)


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
    the paper's numbers beside ours where given) and, for tables that ask, 2-d maps of the first seed.
    """
    started = time.time()
    pictures = out.parent / "results"
    sections = []
    for table in spec.tables:
        arms = list(table.arms)[: spec.max_arms or None]
        scores: dict[str, list[dict[str, float]]] = {}
        for arm in arms:
            for seed in spec.seeds:
                overrides = [*arm.overrides, *table.common, *spec.overrides, f"seed={seed}", "test=false"]
                run = train_run(f"{table.name}/{_slug(arm.name)}/seed{seed}", overrides, runs_dir)
                last = run.output_dir / "checkpoints" / "last.ckpt"
                row = {}
                for split in table.splits:
                    embedded = embed(last, split)
                    row |= {
                        f"{split}/{k}": v for k, v in embedded.scores(table.ks, table.nmi_multiples).items()
                    }
                    if table.pictures and split == "test" and seed == spec.seeds[0]:
                        embedding_map(
                            embedded.embeddings,
                            embedded.labels,
                            pictures / f"{table.name}_{_slug(arm.name)}.png",
                            title=f"{arm.name}: test digits, seed {seed}",
                        )
                scores.setdefault(arm.name, []).append(row)
        sections.append(_section(table, arms, scores))
    minutes = (time.time() - started) / 60
    header = (
        "# Results\n\n"
        f"Generated by `make study` (`python -m dml.study`) in {minutes:.0f} min: do not edit by hand.\n"
        f"Seeds {list(spec.seeds)}; extra overrides {list(spec.overrides) or 'none'}; each run's last "
        "checkpoint is scored. Values: mean +/- 95% confidence half-width over the seeds.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, header + "\n" + "\n".join(sections))
    return out


def _section(table: DictConfig, arms: list, scores: dict[str, list[dict[str, float]]]) -> str:
    keys = [f"{split}/{column}" for split in table.splits for column in table.columns]
    head = (
        "| arm | " + " | ".join(f"{table.splits[k.split('/')[0]]}: {k.split('/', 1)[1]}" for k in keys) + " |"
    )
    lines = [f"## {table.title}\n", head, "|---" * (len(keys) + 1) + "|"]
    for arm in arms:
        cells = []
        for key in keys:
            mean, ci = mean_and_ci([row[key] for row in scores[arm.name]])
            cells.append(f"{mean:.3f} +/- {ci:.3f}")
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
        if arm.get("paper"):
            paper = [f"{arm.paper[k]:.3f}" if k in arm.paper else "" for k in keys]
            lines.append(f"| {arm.name} (paper) | " + " | ".join(paper) + " |")
    if table.pictures:
        lines.append("")
        lines += [f"![{arm.name}](results/{table.name}_{_slug(arm.name)}.png)" for arm in arms]
    return "\n".join(lines) + "\n"


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
