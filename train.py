"""Train an embedding model: python train.py [group=option ...] [key=value ...]."""

import hydra
from omegaconf import DictConfig

from dml.tasks import run_cli, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli(train, cfg)


if __name__ == "__main__":
    main()
