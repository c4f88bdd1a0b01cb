"""Negative-proxy sampling's effect on retrieval: Recall@1 and MAP@R after a short Proxy-Anchor run on
many classes, at each sample rate (``loss.proxy_sample_rate``; 1 sees every proxy).

    python -m benchmarks.proxy_sampling [--rates 1 0.5 0.2 0.1 0.05] [--seeds 0 1 2] [--epochs 6]
        [--classes 1000] [--test-classes 200] [--loss proxy_anchor]

Each run is ``train.py`` on generated data (dml.data.SyntheticDataModule: two visual modes per class, four
32 x 32 images per mode, noise 0.5), the small CNN, 64-d embeddings, batches of 16 classes x 4, on the
CPU; the test classes are other classes. Prints, per rate, the mean and spread over the seeds of
Recall@1 and MAP@R on the test classes and the median seconds per run. The runs' folders go to a
temporary folder, removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(folder: Path, rate: float, seed: int, args: argparse.Namespace) -> tuple[dict, float]:
    overrides = [
        "experiment=synthetic_smoke",
        "backbone=small_cnn",
        f"loss={args.loss}",
        f"dataset.train_classes={args.classes}",
        f"dataset.test_classes={args.test_classes}",
        "dataset.modes_per_class=2",
        "dataset.images_per_mode=4",
        "dataset.noise=0.5",
        "dataset.batch_size=64",
        f"trainer.max_epochs={args.epochs}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "callbacks=no_progress",
        "logger=csv",
        f"seed={seed}",
        f"loss.proxy_sample_rate={rate}",
        f"hydra.run.dir={folder}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the run at rate {rate}, seed {seed} failed:\n{done.stderr[-3000:]}")
    return json.loads((folder / "test_metrics.json").read_text()), seconds


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.05])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--test-classes", type=int, default=200)
    parser.add_argument("--loss", default="proxy_anchor")
    args = parser.parse_args()
    print(
        f"loss={args.loss}, {args.classes} training classes, {args.test_classes} test classes, "
        f"{args.epochs} epochs, seeds {args.seeds}"
    )
    print(f"{'rate':>6}{'R@1 mean':>10}{'R@1 sd':>8}{'MAP@R mean':>12}{'MAP@R sd':>10}{'s/run':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            runs = [one_run(Path(tmp) / f"{rate}_{seed}", rate, seed, args) for seed in args.seeds]
            r1 = [m["test/recall@1"] for m, _ in runs]
            mapr = [m["test/map@r"] for m, _ in runs]
            print(
                f"{rate:>6g}{statistics.mean(r1):>10.4f}{spread(r1):>8.4f}{statistics.mean(mapr):>12.4f}"
                f"{spread(mapr):>10.4f}{statistics.median(s for _, s in runs):>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
