"""An image source held in memory as one uint8 tensor (small benchmarks: MNIST, synthetic)."""

from __future__ import annotations

import torch


class TensorSource:
    """Images as a (N, C, H, W) uint8 tensor; ``load`` returns one image scaled to [0, 1]."""

    def __init__(self, images: torch.Tensor):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"TensorSource expects (N, C, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, index: int) -> torch.Tensor:
        return self.images[index].float().div_(255.0)
