"""Train an embedding model: python train.py [group=option ...] [key=value ...]."""

import sys

import hydra
from omegaconf import DictConfig

from dml.command import check_command_line, run_cli
from dml.tasks import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli(train, cfg)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
