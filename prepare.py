"""Prepare a dataset without training: python prepare.py dataset=<name> (make data DATA=<name>)."""

import sys

import hydra
from omegaconf import DictConfig

from dml.command import check_command_line, run_cli
from dml.tasks import prepare


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    run_cli(prepare, cfg)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
