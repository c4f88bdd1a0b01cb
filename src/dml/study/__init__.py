"""Small-scale studies: train a few configs, embed, compare collapse (the notebooks), and the study
behind ``docs/results.md`` (``make study``: ``python -m dml.study [study=quick]``).

- :mod:`dml.study.experiments`: train a config quietly, embed a split, probe the AntiCo term;
- :mod:`dml.study.report`: the study's spec, statistics (mean and interval, Welch's difference) and tables;
- :mod:`dml.study.runner`: the study itself (its arms x seeds, sweeps, claims) and its command line.
"""

from dml.study.experiments import Embedded, Run, antico_probe, embed, train_run
from dml.study.report import antico_form_gradients, difference_ci, load_spec, mean_and_ci
from dml.study.runner import main, run_study

__all__ = [
    "Embedded",
    "Run",
    "antico_form_gradients",
    "antico_probe",
    "difference_ci",
    "embed",
    "load_spec",
    "main",
    "mean_and_ci",
    "run_study",
    "train_run",
]
