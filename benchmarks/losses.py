"""Forward + backward time of every loss term at SOP scale: B=180 (90 classes x 2), d=512, C=11,318.

    python benchmarks/losses.py [--device cuda] [--repeats 20] [--skip-cxc]

Prints one row per loss of conf/loss (all its terms) with its time and, on a GPU, its peak
memory; then the two Gram sides of the all-proxy coding rate, to show that all-proxy AntiCo costs a
d x d log-determinant, not a C x C one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dml.config import build_loss, loss_names

B, D, C = 180, 512, 11_318


def losses(num_classes: int, embedding_size: int) -> dict[str, torch.nn.Module]:
    """Every loss of conf/loss (``loss=<name>``), as the CompositeLoss a run trains with; seeded."""
    out = {}
    for name in loss_names():
        torch.manual_seed(0)
        out[name] = build_loss(name, num_classes, embedding_size)
    return out


def total(loss: torch.nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The weighted sum a training step backpropagates."""
    return loss(embeddings, labels)["loss"]


def _mib(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"  # nan on CPU: no allocator statistics


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median milliseconds of fn() + backward, and peak MiB allocated on a GPU (nan on CPU)."""
    for _ in range(3):
        fn().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return 1000 * sorted(times)[len(times) // 2], peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--skip-cxc", action="store_true", help="skip the C x C log-determinant (minutes on a CPU)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    labels = torch.randperm(C, device=device)[: B // 2].repeat_interleave(2)
    features = torch.randn(B, D, device=device)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
        f"B={B} ({B // 2} classes x 2), d={D}, C={C}, torch {torch.__version__}"
    )
    print(f"{'loss':<30}{'fwd+bwd ms':>12}{'peak MiB':>10}")
    for name, loss in losses(C, D).items():
        loss = loss.to(device)
        embeddings = torch.nn.functional.normalize(features, dim=1).requires_grad_()
        ms, peak = timed(
            lambda loss=loss, embeddings=embeddings: total(loss, embeddings, labels), device, args.repeats
        )
        print(f"{name:<30}{ms:>12.2f}{_mib(peak):>10}")
    # The two sides of logdet(I + c P^T P) for all C proxies; the package takes the d x d one.
    proxies = torch.nn.functional.normalize(torch.randn(C, D, device=device), dim=1).requires_grad_()
    c = C / (D * 0.5)

    def gram_side(small: bool) -> torch.Tensor:
        gram = proxies.T @ proxies if small else proxies @ proxies.T
        eye = torch.eye(gram.shape[0], device=device)
        return torch.log(torch.diagonal(torch.linalg.cholesky(eye + c * gram))).sum()

    ms, peak = timed(lambda: gram_side(True), device, args.repeats)
    print(f"{'logdet d x d':<30}{ms:>12.2f}{_mib(peak):>10}")
    if not args.skip_cxc:
        ms, peak = timed(lambda: gram_side(False), device, max(3, args.repeats // 5))
        print(f"{'logdet C x C':<30}{ms:>12.2f}{_mib(peak):>10}")


if __name__ == "__main__":
    main()
