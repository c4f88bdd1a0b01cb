"""Evaluate a trained checkpoint: python evaluate.py ckpt_path=<path>.ckpt [dataset.root=...]."""

import hydra
from omegaconf import DictConfig

from dml.tasks import evaluate, run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
