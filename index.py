"""Build a faiss index of an embeddings file: python index.py embeddings=<file> [kind=flat|ivf|hnsw]."""

import hydra
from omegaconf import DictConfig

from dml.tasks import run_cli
from dml.use import index_task


@hydra.main(version_base="1.3", config_path="conf", config_name="index")
def main(cfg: DictConfig) -> float | None:
    return run_cli(index_task, cfg)


if __name__ == "__main__":
    main()
