"""BN-Inception (Inception v2, Ioffe & Szegedy 2015), the backbone of Proxy-Anchor's and AntiCo's main tables.

Not in timm. The architecture is the one of the converted Caffe ImageNet weights that the DML literature
loads (``bn_inception-52deb4733.pth``): every convolution has a bias and is followed by BatchNorm and ReLU;
input BGR in [0, 255] minus the Caffe mean (104, 117, 128); 1,024 channels at stride 32.

The modules here are named by structure (``blocks.3a.b3x3dbl.1``); :func:`file_key_map` is the explicit
mapping from these names to the flat names of the weights file (``inception_3a_double_3x3_1``), so a
load uses every key of the file and misses none.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from dml.errors import UserError
from dml.models import weights
from dml.models.backbones import Backbone, Pooling, pool_features

WEIGHTS_FILE = "bn_inception-52deb4733.pth"
WEIGHTS_URL = "http://data.lip6.fr/cadene/pretrainedmodels/" + WEIGHTS_FILE
# The weights file's own classifier: not part of the backbone, ignored on load.
FILE_CLASSIFIER = ("last_linear.weight", "last_linear.bias")


class BlockSpec(NamedTuple):
    """One Inception block: output widths of its branches (0: branch absent).

    ``pool``: ``avg`` (3x3, stride 1), ``max`` (3x3, stride 1) or ``max_s2`` (3x3, stride 2; then the
    3x3 branches stride 2 too and the pooled branch has no projection: a grid-reduction block).
    """

    name: str
    in_ch: int
    b1x1: int
    reduce: int
    b3x3: int
    double_reduce: int
    double: int
    pool: str
    pool_proj: int


BLOCKS = (
    BlockSpec("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    BlockSpec("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    BlockSpec("3c", 320, 0, 128, 160, 64, 96, "max_s2", 0),
    BlockSpec("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    BlockSpec("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    BlockSpec("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    BlockSpec("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    BlockSpec("4e", 608, 0, 128, 192, 192, 256, "max_s2", 0),
    BlockSpec("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    BlockSpec("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)


class ConvBN(nn.Sequential):
    """Convolution (with bias) -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, momentum: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(cout, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)


class InceptionBlock(nn.Module):
    """Branches 1x1, 1x1 -> 3x3, 1x1 -> 3x3 -> 3x3 and pool (-> 1x1), concatenated on channels."""

    def __init__(self, spec: BlockSpec, momentum: float = 0.1):
        super().__init__()
        s, m = spec, momentum
        stride = 2 if s.pool == "max_s2" else 1
        self.b1x1 = ConvBN(s.in_ch, s.b1x1, 1, momentum=m) if s.b1x1 else None
        self.b3x3 = nn.Sequential(
            ConvBN(s.in_ch, s.reduce, 1, momentum=m), ConvBN(s.reduce, s.b3x3, 3, stride, m)
        )
        self.b3x3dbl = nn.Sequential(
            ConvBN(s.in_ch, s.double_reduce, 1, momentum=m),
            ConvBN(s.double_reduce, s.double, 3, momentum=m),
            ConvBN(s.double, s.double, 3, stride, m),
        )
        if s.pool == "avg":
            self.pool: nn.Module = nn.AvgPool2d(
                3, stride=1, padding=1, ceil_mode=True, count_include_pad=True
            )
        elif s.pool == "max":
            self.pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        else:
            self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.pool_proj = ConvBN(s.in_ch, s.pool_proj, 1, momentum=m) if s.pool_proj else None
        self.out_ch = s.b1x1 + s.b3x3 + s.double + (s.pool_proj or s.in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x)
        branches = [self.b3x3(x), self.b3x3dbl(x), self.pool_proj(pooled) if self.pool_proj else pooled]
        if self.b1x1 is not None:
            branches.insert(0, self.b1x1(x))
        return torch.cat(branches, 1)


class BNInception(Backbone):
    """BN-Inception features pooled to 1,024 (GAP + GMP with ``pooling='avgmax'``, as Proxy-Anchor).

    Args:
        pretrained: load the converted ImageNet weights from torch's hub cache or a download; without
            either, fails at once naming the file to fetch for ``pretrained_file``.
        pretrained_file: ``bn_inception-52deb4733.pth`` (or a state dict with the same keys).
        pooling, freeze_bn: see :class:`~dml.models.backbones.Backbone`.
        in_chans: must be 3.
        bn_momentum: BatchNorm momentum (PyTorch's convention: the weight of the batch's statistics);
            Proxy-Anchor's code builds BN-Inception with 0.9, which matters where BatchNorm trains.
    """

    num_features = 1024
    # Caffe preprocessing: BGR, 0-255, mean subtracted, no scaling (the weights file's own settings).
    data_config = {
        "input_size": (3, 224, 224),
        "mean": (104.0, 117.0, 128.0),
        "std": (1.0, 1.0, 1.0),
        "bgr_255": True,
        "interpolation": "bilinear",
        "crop_pct": 0.875,
    }

    def __init__(
        self,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        pooling: Pooling = "avgmax",
        freeze_bn: bool = False,
        in_chans: int = 3,
        bn_momentum: float = 0.1,
    ):
        super().__init__(pooling, freeze_bn)
        if in_chans != 3:
            raise UserError(f"BN-Inception takes 3 input channels (BGR); got backbone.in_chans={in_chans}")
        m = bn_momentum
        self.stem = nn.Sequential()
        self.stem.add_module("conv1", ConvBN(3, 64, 7, stride=2, momentum=m))
        self.stem.add_module("pool1", nn.MaxPool2d(3, stride=2, ceil_mode=True))
        self.stem.add_module("conv2_reduce", ConvBN(64, 64, 1, momentum=m))
        self.stem.add_module("conv2", ConvBN(64, 192, 3, momentum=m))
        self.stem.add_module("pool2", nn.MaxPool2d(3, stride=2, ceil_mode=True))
        self.blocks = nn.ModuleDict({spec.name: InceptionBlock(spec, m) for spec in BLOCKS})
        if pretrained_file:
            self.load_file(pretrained_file)
        elif pretrained:
            self.load_file_state_dict(weights.url_state_dict(WEIGHTS_URL, "bn_inception"), WEIGHTS_URL)
        if freeze_bn:
            self._freeze_bn_params()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) BGR 0-255 minus mean -> (B, 1024, H/32, W/32)."""
        x = self.stem(x)
        for block in self.blocks.values():
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1024)."""
        return pool_features(self.forward_features(x), self.pooling)

    def load_file(self, path: str | Path) -> None:
        """Load the converted weights file (see :func:`load_file_state_dict`)."""
        path = weights.pretrained_path(str(path), f"fetch {WEIGHTS_URL} and give its path")
        self.load_file_state_dict(
            weights.read_state_dict(path), source=f"backbone.pretrained_file={str(path)!r}"
        )

    def load_file_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a state dict keyed as the weights file: every backbone key filled, every file key used.

        The file's BatchNorm vectors are stored as (1, C) and it has no ``num_batches_tracked``; both are
        accepted. ``last_linear`` (the ImageNet classifier) is ignored.
        """
        mapping = file_key_map(self)
        weights.check_keys(
            set(mapping.values()),
            set(state) - set(FILE_CLASSIFIER),
            source,
            f"is not a BN-Inception weights file like {WEIGHTS_FILE}",
            optional={f for k, f in mapping.items() if k.endswith("num_batches_tracked")},
        )
        own = self.state_dict()
        loaded = {}
        for key, file_key in mapping.items():
            if file_key not in state:  # num_batches_tracked, absent from the old file
                loaded[key] = own[key]
                continue
            value = state[file_key]
            if value.shape != own[key].shape:
                if value.shape != (1, *own[key].shape):  # the file's (1, C) BatchNorm vectors
                    raise UserError(
                        f"{source}: {file_key} has shape {tuple(value.shape)}, BN-Inception's "
                        f"{key} needs {tuple(own[key].shape)}"
                    )
                value = value.reshape(own[key].shape)
            loaded[key] = value
        self.load_state_dict(loaded, strict=True)


def file_key_map(model: BNInception) -> dict[str, str]:
    """{the model's state-dict key: the weights file's key}, for every key of the model.

    ``stem.conv1.conv.weight`` -> ``conv1_7x7_s2.weight``, ``stem.conv1.bn.bias`` -> ``conv1_7x7_s2_bn.bias``,
    ``blocks.3a.b3x3dbl.2.conv.weight`` -> ``inception_3a_double_3x3_2.weight``, ...
    """
    stem = {"conv1": "conv1_7x7_s2", "conv2_reduce": "conv2_3x3_reduce", "conv2": "conv2_3x3"}
    branch = {
        "b1x1": "1x1",
        "b3x3.0": "3x3_reduce",
        "b3x3.1": "3x3",
        "b3x3dbl.0": "double_3x3_reduce",
        "b3x3dbl.1": "double_3x3_1",
        "b3x3dbl.2": "double_3x3_2",
        "pool_proj": "pool_proj",
    }
    out = {}
    for key in model.state_dict():
        layer, kind, param = key.rsplit(".", 2)  # e.g. ("blocks.3a.b3x3dbl.1", "bn", "weight")
        if layer.startswith("stem."):
            name = stem[layer.removeprefix("stem.")]
        else:
            _, block, rest = layer.split(".", 2)
            name = f"inception_{block}_{branch[rest]}"
        out[key] = f"{name}{'_bn' if kind == 'bn' else ''}.{param}"
    return out
