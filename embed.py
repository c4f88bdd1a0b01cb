"""Embed images with a trained model: python embed.py ckpt_path=<ckpt> images=<folder | image | split>."""

import hydra
from omegaconf import DictConfig

from dml.tasks import run_cli
from dml.use import embed_task


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> float | None:
    return run_cli(embed_task, cfg)


if __name__ == "__main__":
    main()
