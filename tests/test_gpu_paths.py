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
