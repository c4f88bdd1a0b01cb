"""Backbones: timm models or a small CNN, returning pooled features of size ``num_features``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

from dml.errors import UserError

Pooling = Literal["avg", "max", "avgmax"]


def pool_features(x: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Global pooling of a (B, C, H, W) map to (B, C).

    ``avgmax`` is GAP + GMP summed, as in the Proxy-Anchor and AntiCo code.
    """
    if pooling == "avg":
        return x.mean(dim=(2, 3))
    if pooling == "max":
        return x.amax(dim=(2, 3))
    if pooling == "avgmax":
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))
    raise ValueError(f"pooling must be 'avg', 'max' or 'avgmax', got {pooling!r}")


class Backbone(nn.Module):
    """Common behaviour: pooling and optionally frozen BatchNorm (eval mode, affine parameters fixed)."""

    num_features: int
    data_config: dict

    def __init__(self, pooling: Pooling = "avg", freeze_bn: bool = False):
        super().__init__()
        if pooling not in ("avg", "max", "avgmax"):
            raise UserError(f"backbone.pooling must be avg, max or avgmax, got {pooling!r}")
        self.pooling, self.freeze_bn = pooling, freeze_bn

    def _freeze_bn_params(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode and self.freeze_bn:
            # Lightning calls train() at every epoch start; keep running statistics fixed.
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


class TimmBackbone(Backbone):
    """A timm model without its classifier, pooled by ``pooling``.

    Args:
        name: any ``timm.list_models()`` name, e.g. ``resnet50``.
        pretrained: load the model's pretrained weights from the hub (needs network).
        pretrained_file: local weights file (.safetensors / .pth / .bin) to load instead; for offline use.
        in_chans: input channels.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        pooling: Pooling = "avg",
        freeze_bn: bool = False,
        in_chans: int = 3,
    ):
        super().__init__(pooling, freeze_bn)
        if name not in timm.list_models():
            close = timm.list_models(f"*{name}*")[:10]
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise UserError(f"backbone.name={name!r} is not a timm model.{hint}")
        kwargs = dict(num_classes=0, in_chans=in_chans)
        if pretrained_file:
            path = Path(pretrained_file).expanduser()
            if not path.is_file():
                raise UserError(
                    f"backbone.pretrained_file={pretrained_file!r} does not exist; give the path of a weights file"
                )
            try:
                self.model = timm.create_model(
                    name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
                )
            except Exception as e:  # noqa: BLE001 - any load failure is the file's fault here
                raise UserError(
                    f"could not load backbone.pretrained_file={pretrained_file!r} into {name}: {e}"
                ) from e
        elif pretrained:
            try:
                self.model = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - hub errors differ by version; all mean "no weights"
                raise UserError(
                    f"could not fetch pretrained weights for backbone {name!r} ({type(e).__name__}). Without network, "
                    "download the weights elsewhere and set backbone.pretrained_file=/path/to/weights.safetensors, "
                    "or train from scratch with backbone.pretrained=false."
                ) from e
        else:
            self.model = timm.create_model(name, pretrained=False, **kwargs)
        self.num_features = self.model.num_features
        self.data_config = timm.data.resolve_model_data_config(self.model)
        if freeze_bn:
            self._freeze_bn_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_features)."""
        feats = self.model.forward_features(x)
        if feats.ndim == 4:
            return pool_features(feats, self.pooling)
        return self.model.forward_head(feats, pre_logits=True)  # token models pool themselves


class SmallCNN(Backbone):
    """A three-block CNN for small grayscale images such as MNIST (28 x 28)."""

    def __init__(self, in_chans: int = 1, width: int = 32, pooling: Pooling = "avg", freeze_bn: bool = False):
        super().__init__(pooling, freeze_bn)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(in_chans, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
        )
        self.num_features = 4 * width
        self.data_config = {
            "input_size": (in_chans, 28, 28),
            "mean": (0.1307,) * in_chans,
            "std": (0.3081,) * in_chans,
        }
        if freeze_bn:
            self._freeze_bn_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, 4 * width)."""
        return pool_features(self.features(x), self.pooling)
