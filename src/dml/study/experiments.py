"""Train a config quietly, embed a split with its checkpoint, probe its AntiCo term: the pieces the
notebooks and the study are made of."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig

from dml.builders import build_data_and_module
from dml.checkpoints import load_checkpoint
from dml.config import compose
from dml.data.datamodule import RetrievalDataModule
from dml.data.splits import RetrievalSplit
from dml.evaluation import collapse_metrics, knn, retrieval_metrics, singular_values
from dml.evaluation.backends import Metric
from dml.evaluation.pictures import split_retrievals
from dml.inference import Embedder
from dml.losses import AntiCoLoss
from dml.tasks import train


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
    split: RetrievalSplit
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
            self.embeddings, self.labels, ks=ks, metric=cast(Metric, self.metric), nmi_multiples=nmi_multiples
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


def antico_probe(checkpoint: str | Path, samples_per_class: int = 10, seed: int = 0) -> dict[str, Any] | None:
    """The AntiCo term of a trained checkpoint on one class-balanced batch of its training split (every
    training class, ``samples_per_class`` images each, drawn with ``seed``): its variant, weight, value
    (exp(-R) in the official form, unweighted), R, and the gradient norm the weighted term sends to the
    embeddings and to the proxies. ``None`` when the run's loss has no AntiCo term."""
    run_cfg, state_dict, data_state = load_checkpoint(Path(checkpoint))
    datamodule, module = build_data_and_module(run_cfg, data_state)
    module.load_state_dict(state_dict)
    module.eval()
    term = cast(AntiCoLoss, module.loss.terms["antico"].loss) if "antico" in module.loss.terms else None
    if term is None:
        return None
    datamodule.setup("fit")
    data = cast(RetrievalDataModule, datamodule).splits["train"]
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
