"""Forward + backward time of every loss term at SOP scale: B=180 (90 classes x 2), d=512, C=11,318.

    python benchmarks/losses.py [--device cuda] [--repeats 20] [--skip-cxc]

Prints one row per term (the terms of the conf/loss files) with its time and, on a GPU, its peak
memory; then the two Gram sides of the all-proxy coding rate, to show that all-proxy AntiCo costs a
d x d log-determinant, not a C x C one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dml.losses import (
    AntiCoLoss,
    ContrastiveLoss,
    DistanceWeightedMiner,
    EasyPositiveMiner,
    MarginLoss,
    MultiSimilarityLoss,
    MultiSimilarityMiner,
    ProxyAnchorLoss,
    ProxyBank,
    ProxyNCALoss,
    RandomTripletMiner,
    SemiHardNegativeMiner,
    Term,
    TripletLoss,
)

B, D, C = 180, 512, 11_318


def terms(bank: ProxyBank) -> dict[str, torch.nn.Module]:
    """The loss terms of conf/loss, with their miners, sharing one proxy bank."""
    return {
        "proxy_anchor": Term(ProxyAnchorLoss(proxies=bank, alpha=32, delta=0.1)),
        "antico batch_proxy": Term(AntiCoLoss("batch_proxy", proxies=bank)),
        "antico all_proxy": Term(AntiCoLoss("all_proxy", proxies=bank)),
        "antico pair": Term(AntiCoLoss("pair")),
        "proxy_nca": Term(ProxyNCALoss(proxies=bank)),
        "ms + ms miner": Term(MultiSimilarityLoss(), MultiSimilarityMiner()),
        "ms + eps miner": Term(MultiSimilarityLoss(base=1.0), MultiSimilarityMiner(positives="easy")),
        "triplet semihard": Term(TripletLoss(), SemiHardNegativeMiner()),
        "triplet random": Term(TripletLoss(), RandomTripletMiner()),
        "triplet eps": Term(TripletLoss(), EasyPositiveMiner("semihard")),
        "triplet all": Term(TripletLoss()),
        "margin distance": Term(MarginLoss(), DistanceWeightedMiner()),
        "margin eps": Term(MarginLoss(), EasyPositiveMiner("distance_weighted")),
        "contrastive": Term(ContrastiveLoss()),
    }


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
    bank = ProxyBank(C, D).to(device)
    labels = torch.randperm(C, device=device)[: B // 2].repeat_interleave(2)
    features = torch.randn(B, D, device=device)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
        f"B={B} ({B // 2} classes x 2), d={D}, C={C}, torch {torch.__version__}"
    )
    print(f"{'term':<22}{'fwd+bwd ms':>12}{'peak MiB':>10}")
    for name, term in terms(bank).items():
        term = term.to(device)
        embeddings = torch.nn.functional.normalize(features, dim=1).requires_grad_()
        ms, peak = timed(
            lambda term=term, embeddings=embeddings: term(embeddings, labels), device, args.repeats
        )
        print(f"{name:<22}{ms:>12.2f}{_mib(peak):>10}")
    # The two sides of logdet(I + c P^T P) for all C proxies; the package takes the d x d one.
    proxies = bank.normalized().detach().float().requires_grad_()
    c = C / (D * 0.5)

    def gram_side(small: bool) -> torch.Tensor:
        gram = proxies.T @ proxies if small else proxies @ proxies.T
        eye = torch.eye(gram.shape[0], device=device)
        return torch.log(torch.diagonal(torch.linalg.cholesky(eye + c * gram))).sum()

    ms, peak = timed(lambda: gram_side(True), device, args.repeats)
    print(f"{'logdet d x d':<22}{ms:>12.2f}{_mib(peak):>10}")
    if not args.skip_cxc:
        ms, peak = timed(lambda: gram_side(False), device, max(3, args.repeats // 5))
        print(f"{'logdet C x C':<22}{ms:>12.2f}{_mib(peak):>10}")


if __name__ == "__main__":
    main()
