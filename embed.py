"""Embed images with a trained model: python embed.py ckpt_path=<ckpt> images=<folder | image | split>."""

import sys

import hydra
from omegaconf import DictConfig

from dml.command import check_command_line, run_cli
from dml.use import embed_task


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> float | None:
    return run_cli(embed_task, cfg)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
