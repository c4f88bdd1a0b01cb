"""The GPU check that fits one call: the probe, the GPU test tier, the throughput at a short but stable size,
and a one-epoch training run with evaluation and embedding, each timed against its budget.

    python -m benchmarks.gpu_check [--device cuda|cpu] [--out gpu-check]     (make gpu-check [DEVICE=cpu])

Writes ``<out>/summary.md`` (ready for docs/benchmarks.md: device, versions, the exact commands, each
step's time against its budget, the probe's tables, the throughput's report, the training's metrics)
and one log per step beside it, rewriting the summary after every step. Exits non-zero when a step
failed or ran past twice its budget. On a GPU the budgets add up to 8 minutes, and ``--deadline`` (540 s)
cuts a step short and skips the rest past it; ``--device cpu`` runs every step at toy sizes (the slow
test tier).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps(device: str, out: Path) -> list[tuple[str, int, list[str], dict[str, str]]]:
    """(name, budget in seconds, command, extra environment) of each step."""
    gpu = device == "cuda"
    data = out / "data"
    py = [sys.executable]
    probe = (
        ["--images", "180"]
        if gpu
        else ["--images", "8", "--backbone", "resnet18", "--size", "64", "--repeats", "1"]
    )
    throughput = (
        ["--batch", "180", "--steps", "30", "--modes", "bf16-cl-compile", "--workers", "16"]
        if gpu
        else ["--backbone", "resnet18", "--batch", "8", "--size", "64", "--steps", "2", "--warmup", "1"]
        + ["--workers", "1", "--per-class", "2", "--modes", "fp32", "--e2e-mode", "fp32"]
    )
    run = out / "run"
    train = [
        "dataset=cub",
        f"paths.data_dir={data}",
        "dataset.download=false",
        "dataset.num_train_classes=100",
        f"hydra.run.dir={run}",
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks=no_progress",
    ] + (
        ["preset=imagenet_finetune", "backbone.pretrained=false", "model.warmup_epochs=0", "trainer=gpu"]
        + ["dataset.num_workers=16"]
        if gpu
        else ["backbone=timm_test", "dataset.image_size=32", "dataset.resize_size=36", "dataset.batch_size=8"]
        + ["dataset.samples_per_class=2", "dataset.num_workers=0", "trainer.accelerator=cpu"]
    )
    embed = [
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "images=test",
        f"out={out / 'test.safetensors'}",
    ]
    per_class = "30" if gpu else "2"
    prepare = "import sys; from pathlib import Path; from benchmarks.throughput import make_cub_layout; "
    prepare += "make_cub_layout(Path(sys.argv[1]) / 'cub', int(sys.argv[2]))"
    return [
        ("data", 30, [*py, "-c", prepare, str(data), per_class], {}),
        (
            "probe",
            60,
            [
                *py,
                "-m",
                "benchmarks.gpu_probe",
                "--device",
                device,
                "--json",
                str(out / "probe.json"),
                *probe,
            ],
            {},
        ),
        (
            "gpu tests",
            60,
            [*py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"],
            {},
        ),
        (
            "throughput",
            210,
            [*py, "-m", "benchmarks.throughput", "--device", device, "--data", str(data), *throughput],
            {"TORCH_LOGS": "recompiles"},
        ),
        ("train one epoch", 90, [*py, "train.py", *train], {}),
        ("embed the test split", 30, [*py, "embed.py", *embed], {}),
    ]


def versions() -> str:
    import lightning
    import torch
    import torchvision

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"none (CPU, {os.cpu_count()} cores)"
    return (
        f"GPU {gpu}; Python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, lightning {lightning.__version__}"
    )


def probe_tables(probe: dict) -> str:
    stages = probe["stages"]
    lines = [
        f"Stages on {probe['images']} CUB-sized JPEGs (median ms; images/s):",
        "",
        "| stage | ms | images/s |",
        "|---|---|---|",
        *(
            f"| {s} | {stages[f'{s}_ms']:.1f} | {stages[f'{s}_images_per_s']:.0f} |"
            for s in ("decode", "augment", "step")
        ),
        "",
        f"Decode + augmentation: {stages['input_share_of_step']:.0%} of the step's time.",
        "",
        "| odd input | batch decoder | decoded in a worker | CPU fallbacks | max diff vs PIL |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {v['batch_decoder']} | {v['decoded_in_worker']} | {v['cpu_fallbacks']} | {v['max_abs_diff_vs_pil']:.0f} |"
            for k, v in probe["odd_inputs"].items()
        ),
        "",
        f"Stream hazard (torchvision issue 9606): {json.dumps(probe['stream_hazard'])}",
    ]
    return "\n".join(lines)


def write_summary(out: Path, rows: list[str], reports: list) -> None:
    """``<out>/summary.md`` as far as the check got: rewritten after every step, so that a call cut off
    still brings back what ran."""
    summary = [
        f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        versions(),
        "",
        "| step | budget (s) | took (s) | status |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    if (out / "probe.json").is_file():
        summary += ["## Probe", "", probe_tables(json.loads((out / "probe.json").read_text())), ""]
    throughput_log = out / "throughput.log"
    if throughput_log.is_file():
        text = throughput_log.read_text().splitlines()
        report = [line for line in text if line.startswith(("device ", "(a)", "(b)", "(c)", "    "))]
        recompiles = sum("Recompiling function" in line for line in text)
        summary += [
            "## Throughput",
            "",
            "```",
            *report,
            "```",
            "",
            f"torch.compile recompilations: {recompiles}",
            "",
        ]
    metrics = out / "run" / "test_metrics.json"
    if metrics.is_file():
        values = json.loads(metrics.read_text())
        summary += [
            "## One epoch",
            "",
            ", ".join(f"{k} {v:.4f}" for k, v in values.items() if "recall" in k),
            "",
        ]
    summary += ["## Commands", "", "```bash"]
    summary += [
        " ".join([*(f"{k}={v}" for k, v in extra.items()), *map(shlex.quote, command)])
        for _, command, extra, _ in reports
    ]
    summary += ["```", ""]
    (out / "summary.md").write_text("\n".join(summary))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check")
    parser.add_argument(
        "--deadline", type=float, default=540, help="seconds for the whole check: later steps are skipped"
    )
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")]))
    rows: list[str] = []
    reports: list = []
    failed, started = False, time.perf_counter()
    for name, budget, command, extra in steps(args.device, out):
        log = out / f"{name.replace(' ', '_')}.log"
        left = args.deadline - (time.perf_counter() - started)
        if left < 10:
            rows.append(
                f"| {name} | {budget} | - | skipped: the deadline ({args.deadline:.0f} s) was reached |"
            )
            failed = True
            write_summary(out, rows, reports)
            continue
        began = time.perf_counter()
        try:
            proc = subprocess.run(
                command,
                cwd=ROOT,
                env=env | extra,
                capture_output=True,
                text=True,
                timeout=min(2 * budget, left),
            )
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            partial = (e.stdout or b"") + (e.stderr or b"")
            text = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
            output, code = f"{text}\nstopped after {e.timeout:.0f} s", -1
        seconds = time.perf_counter() - began
        log.write_text(output)
        ok = code == 0 and seconds <= 2 * budget
        failed |= not ok
        status = "ok" if ok else f"failed (exit {code}; see {log.name})"
        rows.append(f"| {name} | {budget} | {seconds:.0f} | {status} |")
        print(f"{name:<22} {seconds:6.0f} s of {budget:4d} s  {status}", flush=True)
        reports.append((name, command, extra, log))
        write_summary(out, rows, reports)
    print(f"summary: {out / 'summary.md'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
