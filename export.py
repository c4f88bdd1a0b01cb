"""Export a trained model to ONNX and TorchScript: python export.py ckpt_path=<ckpt>."""

import sys

import hydra
from omegaconf import DictConfig

from dml.command import check_command_line, run_cli
from dml.use import export_task


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> float | None:
    return run_cli(export_task, cfg)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
