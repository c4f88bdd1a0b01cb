"""Export a trained model to ONNX and TorchScript: python export.py ckpt_path=<ckpt>."""

import hydra
from omegaconf import DictConfig

from dml.tasks import run_cli
from dml.use import export_task


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> float | None:
    return run_cli(export_task, cfg)


if __name__ == "__main__":
    main()
