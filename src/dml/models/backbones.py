"""Backbones: timm models or a small CNN, returning pooled features of size ``num_features``."""

from __future__ import annotations

from typing import Any, Literal, cast

import timm
import torch
from torch import nn

from dml.errors import UserError
from dml.models import weights

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


def input_channels(backbone: nn.Module) -> int | None:
    """The number of channels ``backbone`` takes: its first convolution's (``None`` without one)."""
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return int(first.in_channels) if first is not None else None


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
    """A timm model without its classifier, pooled by ``pooling`` (CNNs) or ``token_pool`` (ViTs).

    Mean, std, input size, interpolation and crop fraction come from the model's pretrained config
    (``data_config``), which the datamodule takes for what its config leaves null.

    Args:
        name: any ``timm.list_models()`` name, with a pretrained tag where it matters, e.g.
            ``resnet50.tv_in1k``, ``vit_small_patch16_224.dino``.
        pretrained: load the tag's pretrained weights: from the Hugging Face cache or the hub; without
            network and cache this fails at once, naming the file to fetch for ``pretrained_file``.
        pretrained_file: a local weights file (.safetensors, a torch state dict, or .npz for big_vision
            ViTs) to load instead; every key of the model must be filled from it.
        pooling: CNN feature maps: ``avg``, ``max`` or ``avgmax`` (GAP + GMP).
        freeze_bn: BatchNorm layers (where there are any) in eval mode with fixed affine parameters.
        in_chans: input channels.
        token_pool: ViT features: ``cls`` (the class token, after the final norm) or ``mean`` (the mean
            of the patch tokens).
        img_size: ViT input size when it differs from the pretrained one (position embeddings resized on
            load), e.g. 224 for DINOv2's 518.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        pooling: Pooling = "avg",
        freeze_bn: bool = False,
        in_chans: int = 3,
        token_pool: str = "cls",
        img_size: int | None = None,
    ):
        super().__init__(pooling, freeze_bn)
        base, _, tag = name.partition(".")
        if not timm.is_model(base):
            close = timm.list_models(f"*{base}*")[:10]
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise UserError(f"backbone.name={name!r} is not a timm model.{hint}")
        if tag and name not in timm.list_pretrained(f"{base}.*"):
            tags = ", ".join(timm.list_pretrained(f"{base}.*")[:10]) or "none"
            raise UserError(f"backbone.name={name!r}: timm has no weights tagged {tag!r} for {base} ({tags})")
        if token_pool not in ("cls", "mean"):
            raise UserError(f"backbone.token_pool must be cls or mean, got {token_pool!r}")
        kwargs = dict(num_classes=0, in_chans=in_chans) | ({"img_size": img_size} if img_size else {})
        self.name = name
        self.model = cast(Any, _create_timm(name, pretrained, pretrained_file, kwargs))  # timm's API: untyped
        self.token_pool = token_pool
        self.is_token_model = hasattr(self.model, "cls_token") or hasattr(self.model, "num_prefix_tokens")
        if self.is_token_model:
            self.model.reset_classifier(0, global_pool="token" if token_pool == "cls" else "avg")
        self.num_features = self.model.num_features
        self.data_config = dict(timm.data.resolve_model_data_config(self.model))
        if img_size:
            self.data_config["input_size"] = (in_chans, img_size, img_size)
        if freeze_bn:
            self._freeze_bn_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_features)."""
        feats = self.model.forward_features(x)
        if feats.ndim == 4:
            return pool_features(feats, self.pooling)
        return self.model.forward_head(feats, pre_logits=True)  # token models pool themselves

    def layer_groups(self, weight_decay: float, layer_decay: float) -> list[dict]:
        """Parameter groups with layer-wise lr decay (timm's grouping of the model into layers): the last
        layer gets ``lr_scale`` 1, each earlier one ``layer_decay`` times the next; biases, norms and
        the model's ``no_weight_decay`` parameters (position embedding, class token) have no weight decay."""
        from timm.optim import param_groups_layer_decay

        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return param_groups_layer_decay(
            self.model, weight_decay=weight_decay, no_weight_decay_list=tuple(skip), layer_decay=layer_decay
        )


def _create_timm(name: str, pretrained: bool, pretrained_file: str | None, kwargs: dict) -> nn.Module:
    """The timm model with its weights: from ``pretrained_file``, else (``pretrained``) the local hub cache,
    else a download; with no network and no cache, fail at once saying what to fetch."""
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if "img_size" in kwargs and "img_size" in str(e):
            raise UserError(
                f"backbone.img_size is for ViTs; {name} takes any input size: set it to null"
            ) from e
        raise
    if pretrained_file:
        weights.load_file_into(model, pretrained_file, name)
        return model
    if not pretrained:
        return model
    cached = weights.cached_hub_file(name)
    if cached is not None:
        weights.load_state_into(model, weights.read_state_dict(cached), name, str(cached))
        return model
    source = weights.hub_source(name)
    if not source or not weights.reachable(source):
        raise UserError(weights.offline_message(name))
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # hub errors differ by version; all mean "no weights"
        raise UserError(f"{weights.offline_message(name)} ({type(e).__name__}: {e})") from e


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


class GoogLeNet(Backbone):
    """Inception v1 (torchvision's GoogLeNet, with BatchNorm after every convolution): 1,024 features at
    stride 32, for the older DML baselines. Not in timm.

    Args:
        pretrained: torchvision's ImageNet weights (``googlenet-1378be20.pth``), from torch's hub cache or a
            download; without either, fails at once naming the file for ``pretrained_file``.
        pretrained_file: that file (or a state dict with its keys); the auxiliary classifiers and ``fc``
            in it are ignored, every other key must match.
        pooling, freeze_bn: see :class:`Backbone`.
        in_chans: must be 3.
    """

    WEIGHTS_URL = "https://download.pytorch.org/models/googlenet-1378be20.pth"
    num_features = 1024
    data_config = {
        "input_size": (3, 224, 224),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
        "crop_pct": 0.875,
    }
    IGNORED = ("aux1.", "aux2.", "fc.")

    def __init__(
        self,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        pooling: Pooling = "avgmax",
        freeze_bn: bool = False,
        in_chans: int = 3,
    ):
        super().__init__(pooling, freeze_bn)
        if in_chans != 3:
            raise UserError(f"GoogLeNet takes 3 input channels; got backbone.in_chans={in_chans}")
        from torchvision.models import googlenet

        # torchvision's weights expect its input re-normalisation (transform_input, a fixed affine map of
        # the ImageNet-normalised input): always on, so that a network rebuilt without its pretrained
        # weights (to load a checkpoint) computes what it trained with.
        net = googlenet(weights=None, aux_logits=False, transform_input=True, init_weights=True)
        net.avgpool, net.dropout, net.fc = nn.Identity(), nn.Identity(), nn.Identity()
        self.net = net
        if pretrained_file:
            path = weights.pretrained_path(pretrained_file, f"fetch {self.WEIGHTS_URL}")
            self._load(weights.read_state_dict(path), f"backbone.pretrained_file={pretrained_file!r}")
        elif pretrained:
            self._load(weights.url_state_dict(self.WEIGHTS_URL, "googlenet"), self.WEIGHTS_URL)
        if freeze_bn:
            self._freeze_bn_params()

    def _load(self, state: dict[str, torch.Tensor], source: str) -> None:
        state = {k: v for k, v in state.items() if not k.startswith(self.IGNORED)}
        weights.check_keys(set(self.net.state_dict()), set(state), source, "is not torchvision's GoogLeNet")
        self.net.load_state_dict(state, strict=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1024, H/32, W/32)."""
        n = self.net
        x = n._transform_input(x)
        for layer in (n.conv1, n.maxpool1, n.conv2, n.conv3, n.maxpool2, n.inception3a, n.inception3b):
            x = layer(x)
        for layer in (n.maxpool3, n.inception4a, n.inception4b, n.inception4c, n.inception4d, n.inception4e):
            x = layer(x)
        for layer in (n.maxpool4, n.inception5a, n.inception5b):
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1024)."""
        return pool_features(self.forward_features(x), self.pooling)
