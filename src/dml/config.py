"""The project's Hydra config, composed outside the command line (notebooks, scripts, tests)."""

from __future__ import annotations

import collections.abc
import inspect
import os
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dml.errors import UserError


def conf_dir() -> Path:
    """The ``conf/`` folder: ``$DML_CONF``, else the one beside ``src/`` in this checkout."""
    if os.environ.get("DML_CONF"):
        return Path(os.environ["DML_CONF"])
    path = Path(__file__).resolve().parents[2] / "conf"
    if not path.is_dir():
        raise FileNotFoundError(f"no conf/ folder at {path}; set DML_CONF to the project's conf/ folder")
    return path


def compose(
    overrides: Sequence[str] = (), name: str = "train", output_dir: str | Path | None = None
) -> DictConfig:
    """The config ``train.py`` would build from ``overrides``, with its outputs in ``output_dir``.

    Args:
        overrides: Hydra overrides, as on the command line.
        name: ``train``, ``evaluate`` or ``prepare``.
        output_dir: where the run writes (checkpoints, logs, pictures); a new temporary folder if None.
            Data stay in ``paths.data_dir`` as usual.
    """
    output = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="dml-run-"))
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} in paths
    with open_dict(cfg):
        cfg.paths.output_dir = str(output)
        del cfg.hydra
    return cfg


def loss_names() -> list[str]:
    """Every loss a run can select (``loss=<name>``): the files of ``conf/loss/``."""
    return sorted(p.stem for p in (conf_dir() / "loss").glob("*.yaml"))


def build_loss(name: str, num_classes: int, embedding_size: int) -> torch.nn.Module:
    """The CompositeLoss that ``loss=<name>`` trains with, for ``num_classes`` training classes and
    ``embedding_size``-d embeddings (proxies initialised from torch's global generator)."""
    cfg = compose(
        [f"loss={name}", f"dataset.num_train_classes={num_classes}", f"head.out_dim={embedding_size}"],
        output_dir=tempfile.gettempdir(),
    )
    return instantiate(cfg.loss)


# --- values of the wrong type, refused before anything is built ------------------------------------------
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list"}


def _allowed(annotation: Any) -> tuple[type, ...] | None:
    """The types a config value may have for a parameter annotated ``annotation``; ``None`` where the
    annotation says nothing a config value can be checked against (classes, literals, callables)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        allowed: tuple[type, ...] = ()
        for arg in typing.get_args(annotation):
            part = _allowed(arg)
            if part is None:
                return None
            allowed += part
        return allowed
    if annotation is type(None):
        return (type(None),)
    if annotation in (bool, int, str):
        return (annotation,)
    if annotation is float:
        return (int, float)
    if annotation in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        return (list,)
    return None


def _parameters(target: str) -> tuple[dict[str, Any], set[str] | None]:
    """What ``_target_`` takes: its parameters' annotations (a class: its ``__init__`` and those of the
    bases its ``**kwargs`` reach) and their names, ``None`` for the names when it takes any keyword.

    Only dml's own classes are known to hand their ``**kwargs`` to their base class; another library's
    ``**kwargs`` may go anywhere (Lightning's ``DDPStrategy`` hands them to torch's DDP), so they take any
    keyword."""
    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - instantiation will say what is wrong with the target
        return {}, None
    if isinstance(obj, type):
        functions = [c.__dict__["__init__"] for c in obj.__mro__ if "__init__" in c.__dict__]
    else:
        functions = [obj]
    hints: dict[str, Any] = {}
    names: set[str] | None = set()
    for function in functions:
        if function is object.__init__:
            break
        try:
            parameters = inspect.signature(function).parameters.values()
            hints = typing.get_type_hints(function) | hints  # a subclass's annotation wins
        except Exception:  # noqa: BLE001 - unreadable: nothing of it is checked
            return {}, None
        assert names is not None  # only set to None right before a break
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
        if not function.__module__.startswith("dml."):
            names = None  # another library's **kwargs: anything goes
            break
    else:
        names = None  # **kwargs all the way up: anything goes
    hints.pop("return", None)
    return hints, names


def _check_value(value: Any, annotation: Any, key: str) -> None:
    allowed = _allowed(annotation)
    if allowed is None or value == "???":
        return
    fits = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not fits:
        kinds = [
            _KINDS[t] for t in dict.fromkeys(allowed) if t in _KINDS and not (t is int and float in allowed)
        ]
        kinds += ["null"] * (type(None) in allowed)
        quote = (
            f""" (quote it for a string: "{key}='{value}'")""" if str in allowed and value is not None else ""
        )
        raise UserError(f"{key}={value!r} must be {' or '.join(kinds)}{quote}")


def _walk(value: Any, key: str) -> None:
    if isinstance(value, dict):
        target = value.get("_target_")
        hints, names = _parameters(target) if isinstance(target, str) else ({}, None)
        for name, item in value.items():
            if str(name).startswith("_"):
                continue
            if names is not None and name not in names - {"self"}:
                assert isinstance(target, str)  # names are only known for a string target
                raise UserError(
                    f"{key}.{name} is not a setting of {target.rsplit('.', 1)[-1]} ({key}); its settings are: "
                    + ", ".join(sorted(names - {"self"}))
                )
            if name in hints:
                _check_value(item, hints[name], f"{key}.{name}")
            _walk(item, f"{key}.{name}")
    elif isinstance(value, list):
        for item in value:
            _walk(item, key)


# The groups a training run instantiates (the builders in dml.builders, and the trainer), the ones that others
# interpolate from first: a wrong value is named where it was typed (trainer.max_epochs, not scheduler.T_max).
BUILT_GROUPS = ("trainer", "dataset", "head", "backbone", "model", "loss", "optimizer", "scheduler")


def check_types(cfg: DictConfig, keys: Sequence[str] = BUILT_GROUPS) -> None:
    """Refuse, before anything is built, a value of the wrong type for the class the config's ``keys``
    (``dataset``, ``loss``, ...) instantiate, or for one nested in them, naming the key and the type its
    parameter takes (``dataset.batch_size='abc' must be a whole number``).

    Raises:
        UserError: a value does not fit its parameter's annotation.
    """
    if isinstance(cfg.get("dataset"), DictConfig) and cfg.dataset.get("num_train_classes", 0) is None:
        cfg = cfg.copy()  # a user's data: the count is read from them when built; a stand-in here
        with open_dict(cfg):
            cfg.dataset.num_train_classes = 1
    for key in keys:
        node = cfg.get(key)
        if isinstance(node, DictConfig):
            _walk(OmegaConf.to_container(node, resolve=True), key)
