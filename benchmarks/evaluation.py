"""Retrieval metrics at SOP scale: 60,502 test embeddings of 512-d in 11,316 classes of 2-12 images.

    python benchmarks/evaluation.py [--methods torch faiss pml] [--n 60502]

Each method runs in a fresh process on the same embeddings; the table gives its wall time and peak
resident memory (the process's whole footprint, imports included, and the part above the footprint
before the metrics started). ``torch`` and ``faiss`` compute the package's full suite (Recall@1/10/100/
1000, MAP@R, R-Precision); ``pml`` is pytorch-metric-learning's AccuracyCalculator computing precision@1,
MAP@R and R-Precision only. The three agree on the metrics they share.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

KS = (1, 10, 100, 1000)


def sop_like(n: int, d: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings around random class centres, class sizes 2-12 (SOP's test set averages 5.3)."""
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(
            int(torch.randint(2, 13, (1,), generator=g))
            if torch.rand(1, generator=g) < 0.35
            else 2 + int(torch.randint(0, 6, (1,), generator=g))
        )
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 2:
        sizes[-2] += sizes.pop()
    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    centres = torch.randn(len(sizes), d, generator=g)
    x = centres[labels] + 2.5 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1), labels


def peak_mib() -> float:
    """This process's peak resident memory: VmHWM where /proc has it (getrusage's ru_maxrss also keeps
    the peak of the process this one was forked from)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, n: int, device: str = "cpu") -> dict:
    x, y = sop_like(n)
    x = x.to(device)
    before = peak_mib()
    start = time.perf_counter()
    if method == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r", "r_precision"), k="max_bin_count"
        )
        raw = calc.get_accuracy(x, y)
        metrics = {
            "recall@1": raw["precision_at_1"],
            "map@r": raw["mean_average_precision_at_r"],
            "r_precision": raw["r_precision"],
        }
    else:
        from dml.evaluation import retrieval_metrics

        metrics = retrieval_metrics(x, y, ks=KS, backend=method, nmi=False)
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "seconds": seconds,
        "peak_mib": peak_mib(),
        "before_mib": before,
        "metrics": metrics,
        "classes": int(y.max()) + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["torch", "faiss", "pml"])
    parser.add_argument("--n", type=int, default=60_502)
    parser.add_argument("--device", default="cpu", help="where the torch backend computes (cpu or cuda)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.device)))
        return
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--one", method, "--n", str(args.n), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{method}: failed\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"n={args.n}, d=512, {rows[0]['classes'] if rows else '?'} classes, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    keys = ["recall@1", "recall@10", "recall@100", "recall@1000", "map@r", "r_precision"]
    print(
        f"{'method':<8}{'seconds':>9}{'peak MiB':>10}{'(+ for metrics)':>16}  "
        + "".join(f"{k:>12}" for k in keys)
    )
    for r in rows:
        values = "".join(f"{r['metrics'][k]:>12.4f}" if k in r["metrics"] else f"{'-':>12}" for k in keys)
        print(
            f"{r['method']:<8}{r['seconds']:>9.1f}{r['peak_mib']:>10.0f}{r['peak_mib'] - r['before_mib']:>16.0f}  {values}"
        )


if __name__ == "__main__":
    main()
