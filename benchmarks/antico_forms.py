"""Gradient of all-proxy AntiCo in its two forms as the number of proxies grows.

    python benchmarks/antico_forms.py [--dim 512] [--classes 100 1000 11318]

For C random unit proxies in d dimensions (official scale C / (d eps), eps 0.5), prints the coding rate
R, the value of each form and the norm of its gradient with respect to the proxies: exp(-R) (the
official form) underflows as R grows with C, so its gradient vanishes; -R (``form: neg``) keeps one.
"""

from __future__ import annotations

import argparse

import torch

from dml.study import antico_form_gradients


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 11_318])
    args = parser.parse_args()
    print(f"d={args.dim}, eps 0.5, official scale C/(d eps), float32, torch {torch.__version__}")
    print(f"{'C':>7}{'R':>12}{'exp(-R)':>12}{'|grad exp(-R)|':>16}{'|grad -R|':>12}")
    for row in antico_form_gradients(args.dim, args.classes):
        print(
            f"{row['classes']:>7}{row['rate']:>12.2f}{row['exp_value']:>12.3g}{row['exp_grad']:>16.3g}"
            f"{row['neg_grad']:>12.3g}"
        )


if __name__ == "__main__":
    main()
