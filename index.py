"""Build a faiss index of an embeddings file: python index.py embeddings=<file> [kind=flat|ivf|hnsw]."""

import sys

import hydra
from omegaconf import DictConfig

from dml.command import check_command_line, run_cli
from dml.use import index_task


@hydra.main(version_base="1.3", config_path="conf", config_name="index")
def main(cfg: DictConfig) -> float | None:
    return run_cli(index_task, cfg)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
