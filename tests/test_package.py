import pytest
import torch
import triton
import triton.language as tl

import nemokern
from nemokern.kernels._rounding import cast_to
from nemokern.ops._dispatch import backend_for


def test_extension_builds_and_imports():
    from nemokern import _C

    assert _C.abi_version() >= 1
    assert isinstance(_C.with_cuda, bool)


def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv("NEMOKERN_BACKEND", raising=False)
    assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("NEMOKERN_BACKEND", "triton")
    assert backend_for(torch.zeros(1)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend_for(torch.zeros(1))
    monkeypatch.setenv("NEMOKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NEMOKERN_BACKEND"):
        backend_for(torch.zeros(1))


def test_setup_py_never_imports_torch():
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parents[1] / "setup.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert "pybind11" in names  # the walk sees imports at all
    assert "torch" not in names


def test_version():
    assert nemokern.__version__


def test_check_tensors_names_the_argument():
    from nemokern.ops._dispatch import check_tensors

    a = torch.zeros(2)
    with pytest.raises(TypeError, match="op: b must be a torch.Tensor"):
        check_tensors("op", {"a": a, "b": [1.0]})
    with pytest.raises(ValueError, match="op: b is on meta but a is on cpu"):
        check_tensors("op", {"a": a, "b": torch.zeros(2, device="meta")})
    with pytest.raises(TypeError, match="op: b has dtype torch.int64"):
        check_tensors("op", {"a": a, "b": torch.zeros(2, dtype=torch.long)}, (torch.float32,), ("b",))
    check_tensors("op", {"a": a, "b": torch.zeros(2, dtype=torch.long)}, (torch.float32,), ("a",))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, cast_to(x, y_ptr.dtype.element_ty), mask=offs < n)


def test_bf16_rounding_helper_matches_torch_including_nan():
    """kernels/_rounding.cast_to must give torch's fp32 -> bf16 bits (nearest-even). NaN must stay
    NaN: a GPU's arithmetic NaN is 0x7FFFFFFF, which the rounding carry would turn into -0.0."""
    special = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0xFFBFFFFF, 0x7F800000,
               0xFF800000, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0x00000001, 0x80008000, 0]
    bits = torch.tensor(special, dtype=torch.int64).to(torch.int32)  # wraps to the same bits
    x = torch.cat([bits.view(torch.float32),
                   torch.randn(100, generator=torch.Generator().manual_seed(0)) * 1e3])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=128)
    want = x.to(torch.bfloat16)
    assert torch.equal(torch.isnan(y), torch.isnan(want)), (x[:13], y[:13], want[:13])
    ok = torch.isnan(want)
    assert torch.equal(y[~ok].view(torch.int16), want[~ok].view(torch.int16))
