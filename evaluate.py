"""Evaluate a trained checkpoint: python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt [dataset.root=...]."""

import sys

import hydra
from omegaconf import DictConfig

from dml.command import check_command_line, force_add, run_cli
from dml.tasks import MODEL_KEYS, evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return run_cli(evaluate, cfg)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    # dataset.<key>=... patches the checkpoint's dataset, whose keys the default dataset may lack.
    sys.argv[1:] = force_add(sys.argv[1:], MODEL_KEYS)
    main()
