"""Search an index: python search.py index=<dir> query=<image | folder | split> k=10."""

import sys

import hydra
from omegaconf import DictConfig

from dml.command import check_command_line, run_cli
from dml.use import search_task


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> float | None:
    return run_cli(search_task, cfg)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
