"""The GPU code paths' choices, checked on the CPU: which device a tensor, an index or a decoder goes to."""

from __future__ import annotations

import pytest
import torch

from dml.evaluation.retrieval import faiss_device
from dml.inference.embedder import resolve_device


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two GPUs whose process works on the second (as DDP rank 1 does)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_a_gpu_is_always_named_by_its_number(two_gpus):
    # cuda and cuda:1 would be two devices to torchvision's decoder cache: one is built per name
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_a_faiss_index_goes_to_this_process_s_gpu(two_gpus):
    assert faiss_device(torch.device("cuda", 0)) == 0  # the embeddings' own GPU
    assert faiss_device(torch.device("cpu")) == 1  # else this rank's, not GPU 0


@pytest.mark.slow  # a few minutes: every step of the GPU check at toy sizes
def test_the_gpu_check_runs_on_the_cpu_and_writes_its_summary(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:] + summary
    for step in ("probe", "gpu tests", "throughput", "train one epoch", "embed the test split"):
        assert f"| {step} |" in summary and "failed" not in summary
    assert "| progressive | False | True | 0 |" in summary  # sent to the workers, no fallback
    assert "(b) end-to-end training images/s" in summary and "test/recall@1" in summary
    assert (tmp_path / "test.safetensors").is_file()
