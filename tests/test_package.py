import pytest
import torch

import nemokern
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
