"""Shared test setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so
TRITON_INTERPRET must be set before any nemokern kernel module is imported: here, first thing.
On a machine without CUDA the Triton kernels run through the interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreted on the CPU) for the duration of a test."""
    monkeypatch.setenv("NEMOKERN_BACKEND", "triton")
    yield


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("NEMOKERN_BACKEND", "torch")
    yield
