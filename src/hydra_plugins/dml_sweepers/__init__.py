"""dml's Hydra plugins (Hydra finds plugins only in the ``hydra_plugins`` namespace package).

:class:`OptunaSweeper` is the Optuna sweeper with the end of a search in which every trial failed put in
dml's words: the list of the failed jobs and why each failed (``<job dir>/FAILED``), exit code 1, where
Optuna would raise ``No trials are completed yet``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:  # the Optuna sweeper comes with the dev extra; without it, this plugin is not offered
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _Optuna
except ImportError:  # pragma: no cover - exercised only where the plugin is not installed
    _Optuna = None  # type: ignore[assignment,misc]  # None: the plugin is not installed

if _Optuna is not None:

    class OptunaSweeper(_Optuna):
        """Hydra's Optuna sweeper; a search whose every trial failed ends in dml's summary of them."""

        def sweep(self, arguments: list[str]) -> Any:
            try:
                return super().sweep(arguments)
            except ValueError as e:
                if "No trials are completed yet" not in str(e):
                    raise
                from dml.command import report_failed_jobs

                config = self.sweeper.config
                assert config is not None  # set by setup, before the sweep
                report_failed_jobs(Path(config.hydra.sweep.dir), ran=self.sweeper.n_trials)
                raise
