"""The study's pictures of a table: its claims as a forest plot, how its arms converged, and the gradient
each loss term sent at the start, middle and end of training (from each run's ``training_record.json``)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dml.evaluation.pictures import plt, save_figure
from dml.study.report import Checked, mean_and_ci


def forest_plot(claims: Sequence[Checked], path: Path, title: str) -> Path:
    """One row per claim: the difference of means (dot) and its Welch 95% interval (bar), a panel per
    metric (their scales differ), a line at 0; held in green, did not hold in red, not separated grey."""
    metrics = list(dict.fromkeys(c.metric for c in claims))
    rows = [[c for c in claims if c.metric == m] for m in metrics]
    heights = [len(r) + 1 for r in rows]
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(9, 0.32 * sum(heights) + 1.2), gridspec_kw={"height_ratios": heights}
    )
    colours = {"held": "tab:green", "did not hold": "tab:red", "not separated": "0.45"}
    for ax, metric, group in zip(np.atleast_1d(axes), metrics, rows, strict=True):
        y = np.arange(len(group))[::-1]
        for yi, c in zip(y, group, strict=True):
            colour = colours[c.verdict]
            if np.isfinite(c.low):
                ax.plot([c.low, c.high], [yi, yi], color=colour, lw=2)
            ax.plot([c.difference], [yi], "o", color=colour)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, [_short(c.label or c.text, 80) for c in group], fontsize=8)
        ax.set_ylim(-0.7, len(group) - 0.3)
        ax.set_title(f"difference in {metric}", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"{title}\n(dot: difference of means; bar: Welch 95% interval; green held, red did not hold)",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _wrap(title: str) -> str:
    return textwrap.fill(title, 110)


def convergence_plot(records: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Validation metric against epochs (left) and against training time (right), an arm per line: the
    mean over its seeds with the 95% interval shaded; time is the seeds' mean time at each epoch."""
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    metric = ""
    for i, (arm, runs) in enumerate(records.items()):
        metric = runs[0]["metric"]
        epochs = sorted(set.intersection(*({e["epoch"] for e in r["epochs"]} for r in runs)))
        if not epochs:
            continue
        values = [[next(e for e in r["epochs"] if e["epoch"] == x) for r in runs] for x in epochs]
        stats = [mean_and_ci([e[metric] for e in at]) for at in values]
        mean = np.array([m for m, _ in stats])
        half = np.nan_to_num(np.array([h for _, h in stats]))
        seconds = np.array([np.mean([e["seconds"] for e in at]) for at in values])
        style = {"color": plt.get_cmap("tab20")(i % 20), "label": arm, "ls": "-" if i < 10 else "--"}
        for ax, x in ((by_epoch, np.array(epochs)), (by_time, seconds)):
            ax.plot(x, mean, marker=".", **style)
            ax.fill_between(x, mean - half, mean + half, color=style["color"], alpha=0.15)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training time (s, validation left out)")
    by_epoch.set_ylabel(f"validation {metric}")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(_wrap(title), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def term_gradients(runs: Sequence[dict[str, Any]], term: str, to: str) -> dict[str, float]:
    """The median over the runs of the gradient norm ``term`` sent ``to`` the embeddings or the proxies
    at the first measured step, the one nearest the middle and the last."""
    found: dict[str, list[float]] = {"start": [], "middle": [], "end": []}
    for run in runs:
        rows = [g for g in run["gradients"] if g["term"] == term]
        if not rows:
            continue
        steps = sorted({g["step"] for g in rows})
        middle = min(steps, key=lambda s: abs(s - steps[-1] / 2))
        for when, step in (("start", steps[0]), ("middle", middle), ("end", steps[-1])):
            found[when].append(float(next(g for g in rows if g["step"] == step)[to]))
    return {when: float(np.median(v)) for when, v in found.items() if v}


BARS = (  # (whose, to what, colour, hatch)
    ("base loss", "embeddings", "tab:blue", ""),
    ("base loss", "proxies", "tab:blue", "//"),
    ("AntiCo term", "embeddings", "tab:orange", ""),
    ("AntiCo term", "proxies", "tab:orange", "//"),
)


def gradient_plot(
    records: dict[str, list[dict[str, Any]]], path: Path, title: str, term: str = "antico"
) -> Path:
    """For each arm with a ``term``: the norm of the gradient the weighted term sent to the batch
    embeddings and to the proxies, beside the base loss's (the other terms; with several, their norms
    are combined as if their gradients were orthogonal), at the start, middle and end of training, on a
    log scale. A gradient to the proxies moves them by the proxies' learning rate, often 100x the
    network's."""
    arms = {a: r for a, r in records.items() if any(g["term"] == term for run in r for g in run["gradients"])}
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.7 * len(arms) + 2), sharey=True, sharex=True)
    floor, height = 1e-14, 0.2
    for ax, when in zip(axes, ("start", "middle", "end"), strict=True):
        y = np.arange(len(arms))[::-1]
        for yi, runs in zip(y, arms.values(), strict=True):
            names = {g["term"] for run in runs for g in run["gradients"]} - {term}
            for i, (whose, to, colour, hatch) in enumerate(BARS):
                parts = [term] if whose == "AntiCo term" else sorted(names)
                norm = float(
                    np.hypot.reduce([term_gradients(runs, n, to).get(when, 0.0) for n in parts] or [0.0])
                )
                label = f"{whose}, to the {to}" if yi == y[0] else None
                ax.barh(
                    yi + (1.5 - i) * height,
                    max(norm, floor),
                    height=height,
                    color=colour,
                    hatch=hatch,
                    edgecolor="white",
                    label=label,
                )
        ax.set_xscale("log")
        ax.set_xlim(left=floor)
        ax.set_title(f"{when} of training", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(y, [_short(a, 45) for a in arms], fontsize=8)
    axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[1].set_xlabel("gradient norm of the weighted term (median over seeds; log scale; 1e-14 = none)")
    fig.suptitle(_wrap(title), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
