"""Shared pytest setup: determinism, the `gpu` marker, and small fixtures."""

import os

import pytest
import torch

# One thread keeps CPU results bitwise-reproducible and leaves the second core to the other rank in
# multi-process tests.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is absent (CI never has a GPU)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
