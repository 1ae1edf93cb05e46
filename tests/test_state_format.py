"""engine/state_format.host_copy: what a checkpoint writes of each tensor is one contiguous host
copy that shares no memory with the live tensor, made with one copy of its bytes (from a GPU,
`.to("cpu").contiguous().clone()` made two host copies)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import FakeCuda
from nemokern.engine.state_format import host_copy

COPIES = {"aten::clone", "aten::_to_copy", "aten::copy_", "aten::contiguous"}


class CountCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func._schema.name in COPIES
        return func(*args, **(kwargs or {}))


def test_host_copy_is_compact_and_unshared():
    base = torch.randn(7, 13, dtype=torch.float64)
    view = base[1:6, ::3]  # strided, offset
    out = host_copy(view)
    assert out.is_contiguous() and out.device.type == "cpu" and torch.equal(out, view)
    assert out.untyped_storage().nbytes() == view.numel() * view.element_size()
    out.add_(1)
    assert torch.equal(base[1:6, ::3], view) and not torch.equal(out, view)
    assert host_copy(torch.tensor(3.0, requires_grad=True)).requires_grad is False


def test_host_copy_copies_a_gpu_tensor_once():
    """Under tests/helpers.FakeCuda a "cuda" tensor's .to("cpu") is a real copy, as on a GPU."""
    with FakeCuda():
        live = torch.randn(6, 10, device="cuda")[:, ::2]
        with CountCopies() as count:
            out = host_copy(live)
        with CountCopies() as old:
            live.to("cpu").contiguous().clone()
    assert count.n == 1 and old.n == 2, (count.n, old.n)
    assert torch.equal(out, live.cpu())
