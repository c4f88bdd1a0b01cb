"""Prepare a dataset without training: python prepare.py dataset=<name> (make data DATA=<name>)."""

import hydra
from omegaconf import DictConfig

from dml.tasks import prepare, run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    run_cli(prepare, cfg)


if __name__ == "__main__":
    main()
