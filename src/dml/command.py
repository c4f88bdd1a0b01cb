"""The command line's policy: what a user sees when a task ends, and the checks made before Hydra runs.

- :func:`run_cli` runs a task for a ``@hydra.main`` shim: a user error is its message alone (exit 2), a
  signal its message and the signal's exit code; a sweep's failed job is recorded and the sweep goes on.
- :class:`RunFolders` (a Hydra callback) checks the run folder before Hydra writes into it and lists a
  sweep's failed jobs at its end; :func:`report_failed_jobs` is that list.
- :func:`check_command_line` reads the overrides before Hydra does and says how to quote a value that
  Hydra's grammar cannot read (non-ASCII letters, brackets, parentheses).
"""

from __future__ import annotations

import re
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dml.config import check_types
from dml.errors import UserError
from dml.io import write_atomic
from dml.log import get_logger
from dml.runs import (
    REPLACED,
    RunStopped,
    check_writable,
    claim_run_dir,
    is_launching_process,
    replaced_note,
)

log = get_logger(__name__)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr)  # noqa: T201 - the message a user must see
    sys.exit(code)


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The :class:`UserError` behind ``exc`` (itself, or in its chain of causes), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def user_message(error: UserError) -> str:
    """The error's own message; a DataLoader worker's copy of it carries the worker's traceback first."""
    text = str(error)
    marker = f"{UserError.__module__}.{UserError.__name__}: "
    return text[text.rindex(marker) + len(marker) :].strip() if marker in text else text


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under @hydra.main
        return False


def _usage() -> str:
    """The running script's usage line (its docstring after the colon), or ''."""
    doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip().splitlines()
    return doc[0].split(": ", 1)[1].rstrip(".") if doc and ": python " in doc[0] else ""


# Keys a task needs that its config cannot mark ??? (evaluate.yaml's ckpt_path merges over train's null,
# and OmegaConf keeps a value that ??? is merged over).
REQUIRED = {"evaluate": ("ckpt_path",)}


def check_required(cfg: DictConfig) -> None:
    """Refuse a config whose mandatory values (``???``) were not given, naming them and the usage line."""
    keys = cast(list[str], [key for key in cfg if key != "hydra"])  # a DictConfig's keys are strings here
    own = OmegaConf.masked_copy(cfg, keys)  # Hydra's own has ??? too
    try:
        missing = sorted(OmegaConf.missing_keys(own))
    except Exception:  # noqa: BLE001 - a broken interpolation: the task itself reports it
        return
    missing += [key for key in REQUIRED.get(cfg.get("task_name"), ()) if cfg.get(key) in (None, "", [])]
    if missing:
        usage = _usage()
        raise UserError(
            f"{', '.join(f'{key}=' for key in missing)} must be given" + (f": {usage}" if usage else "")
        )


def _record_failed_job(cfg: DictConfig, error: Exception, user_error: UserError | None) -> None:
    """Keep a failed sweep job's reason in ``<job dir>/FAILED`` (listed when the sweep ends) and go on."""
    reason = user_message(user_error) if user_error else "".join(traceback.format_exception(error))
    overrides = " ".join(HydraConfig.get().overrides.task)
    output_dir = Path(cfg.paths.output_dir)
    log.error("job %s failed; the sweep goes on:\n%s", output_dir.name, reason)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / "FAILED", f"overrides: {overrides}\n{reason}\n")
    except UserError as e:
        log.error("%s", e)


def _replaced_note(cfg: DictConfig) -> str:
    """For a training run that failed while replacing a finished one: where that one is kept."""
    if cfg.get("task_name") != "train" or not is_launching_process():
        return ""
    note = replaced_note(Path(cfg.paths.output_dir))
    return f"\n{note}" if note else ""


def run_cli(task: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    """Run ``task`` for a ``@hydra.main`` shim and return ``optimized_metric`` for Hydra sweepers.

    A user error ends in its message alone (exit code 2), a run stopped by a signal in its message and
    the signal's exit code (130 SIGINT, 143 SIGTERM); a training run that was replacing a finished run
    (``overwrite=true``) says where that run is kept. In a sweep, a job that fails is recorded as failed
    (``<job dir>/FAILED``; for Optuna, a failed trial) and the sweep goes on; :class:`RunFolders` lists
    the failed jobs at the end.
    """
    try:
        check_required(cfg)
        metrics = task(cfg)
    except RunStopped as e:
        fail(f"{e}{_replaced_note(cfg)}", e.exit_code)
    except KeyboardInterrupt:
        name = cfg.get("task_name", "the run")
        fail(f"{name} interrupted; nothing it was writing was left behind{_replaced_note(cfg)}", 130)
    except Exception as e:
        user_error = find_user_error(e)
        if is_multirun():
            _record_failed_job(cfg, e, user_error)
            return None  # no value: Optuna records a failed trial (NaN would end its search)
        note = _replaced_note(cfg)
        if REPLACED in str(user_error):  # the message says it already
            note = ""
        if user_error is None:
            if note:
                print(note.strip(), file=sys.stderr)  # noqa: T201 - the traceback follows
            raise
        fail(f"{user_message(user_error)}{note}")
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


def report_failed_jobs(sweep_dir: Path, ran: int | None = None) -> None:
    """List the failed jobs of the sweep in ``sweep_dir`` (their ``FAILED`` files) and exit with 1; return
    when none failed. ``ran``: how many jobs ran, when every one of them failed."""
    failed = sorted(sweep_dir.glob("*/FAILED"), key=lambda p: p.parent.name)
    if not failed:
        return
    lines = [f"  {p.parent}: {p.read_text().splitlines()[-1]}" for p in failed]
    summary = (
        f"{len(failed)} job(s) of the sweep failed (the others finished)"
        if ran is None
        else f"all {ran} jobs of the sweep failed, so it has no best result"
    )
    fail(f"{summary}:\n" + "\n".join(lines), 1)


class RunFolders(Callback):
    """Hydra callback: a run or sweep folder that cannot be created is one message (exit code 2), before
    Hydra writes into it; after a sweep, its failed jobs (their ``FAILED`` files) are listed and the
    sweep exits with 1."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Before Hydra writes its .hydra/ and log into the run folder: a training run claims it first.
        HydraConfig.instance().set_config(config)  # Hydra sets it later; the folder's ${hydra:...} need it
        folder = Path(config.hydra.run.dir)
        try:
            check_required(config)
            if config.get("task_name") == "train":
                check_types(config)  # a typo must not set a finished run aside (overwrite=true)
                claim_run_dir(folder, config.get("ckpt_path"), bool(config.get("overwrite")))
            else:
                check_writable(folder, "hydra.run.dir=<folder>")
        except UserError as e:
            fail(str(e))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        try:
            check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir=<folder>")
        except UserError as e:
            fail(str(e))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report_failed_jobs(Path(config.hydra.sweep.dir))


# Functions of Hydra's override grammar: a value that starts with one is a sweep (choice(1,2)), not a name.
GRAMMAR_FUNCTIONS = (
    "choice",
    "range",
    "interval",
    "tag",
    "sort",
    "shuffle",
    "glob",
    "int",
    "float",
    "str",
    "bool",
)


def check_command_line(argv: Sequence[str]) -> None:
    """Refuse, before Hydra parses them, overrides whose value Hydra's grammar cannot read but can once
    quoted (a path with non-ASCII letters, brackets or parentheses), saying how to write it.

    Hydra would print its parser's error without saying that quoting is the cure.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            key, value = arg.split("=", 1)
            if re.match(rf"\s*({'|'.join(GRAMMAR_FUNCTIONS)})\(", value):
                return  # a sweep (choice(...)) typed wrong, not a name to quote
            quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            try:
                parser.parse_overrides([f"{key}={quoted}"])
            except OverrideParseException:
                return  # not a quoting matter: Hydra's own message says what is wrong
            fail(
                f"Hydra cannot read the value of {arg!r} as it stands. If it is a path or a name, quote it for "
                "Hydra (a value with non-ASCII letters or characters such as [ ] ( ) { } must be quoted): write "
                f"{key}={quoted}, which in a shell is {shlex.quote(f'{key}={quoted}')}"
            )


def force_add(argv: Sequence[str], groups: Sequence[str]) -> list[str]:
    """``argv`` with each plain override of a key under ``groups`` (``dataset.root=...``) written
    ``++dataset.root=...``, so that it patches a value the composed config lacks (the checkpoint's dataset
    may have keys that the default one has not) instead of being refused as not in struct."""
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" in arg and "." in key and key.split(".")[0] in groups and not key.startswith(("+", "~")):
            arg = f"++{arg}"
        out.append(arg)
    return out
