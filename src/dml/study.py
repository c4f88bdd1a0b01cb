"""Small-scale studies from Python (the notebooks): train a few configs, embed, compare collapse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from dml.config import compose
from dml.evaluation import collapse_metrics, knn, singular_values
from dml.evaluation.pictures import split_retrievals
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

    def collapse(self) -> dict[str, float]:
        return collapse_metrics(self.embeddings, self.labels)

    def spectrum(self) -> torch.Tensor:
        return singular_values(self.embeddings)

    def nearest(self) -> torch.Tensor:
        """Each item's nearest other item (position in the split)."""
        return knn(self.embeddings, k=1, backend="torch")[:, 0]

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
            self.embeddings, self.labels, self.split.roles, self.split.raw_image, queries, path, top_k
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
    """Embed a split (``train``, ``val`` or ``test``) with a checkpoint written by ``train.py``."""
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
    return Embedded(torch.cat(outputs), data.labels.clone(), data, dict(data.extra_labels))
