"""The random state a checkpoint keeps, so that a resumed run draws what an uninterrupted one would
(augmentations, random miners): Python's, numpy's, torch's (CPU and CUDA) and the loss's miners'."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

if TYPE_CHECKING:
    from dml.losses import CompositeLoss


def capture(loss: CompositeLoss) -> dict[str, Any]:
    """This process's random state, with ``loss``'s miners' (``loss.random_state()``)."""
    return {
        "python": random.getstate(),
        # numpy's stubs pick the legacy=False overload for a bare call; the default (legacy) is a tuple
        "numpy": _numpy_state_to_plain(cast(tuple, np.random.get_state())),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "miners": loss.random_state(),
    }


def restore(state: dict[str, Any], loss: CompositeLoss) -> None:
    """Set this process's random state (and ``loss``'s miners') to ``state`` from :func:`capture`; the
    CUDA state only where the same number of devices is visible."""
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    loss.load_random_state(state["miners"])


# Lightning loads checkpoints with weights_only=True: numpy arrays are not allowed there, tensors are.
def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached
