"""No module of the package imports another module's private name (style.md: what two siblings
share belongs in a module both import, under a public name).

A private *module* (`from . import _checks`, `kernels/_policy_chunks.py`) is how a package shares
code among its own modules; the names it offers are public. The compiled extension `_C` is a
module too."""

import ast

import pytest

from helpers import import_from_base, is_module, package_modules


def private_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    """'module (line N) imports name from other' for each private name `source` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = import_from_base(module, node, is_package)
        if not base.startswith("nemokern"):
            continue  # other libraries' private names are their business (and rare here)
        for alias in node.names:
            if alias.name.startswith("_") and not is_module(f"{base}.{alias.name}"):
                found.append(f"{module} (line {node.lineno}) imports {alias.name} from {base}")
    return found


def test_no_module_imports_a_private_name():
    found = []
    for name, path, is_package in package_modules():
        found += private_imports(name, path.read_text(), is_package)
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from .linear_logprobs import _mm_fp32\n",
        "from nemokern.data.readers import DataError, _turns\n",
        "def f():\n    from ..engine.loop import _helper\n",  # inside a function, two levels up
    ],
)
def test_a_planted_private_import_fails(source):
    assert private_imports("nemokern.kernels.logprobs", source)


@pytest.mark.parametrize(
    "source",
    [
        "from . import _checks\n",  # a private module of the package
        "from . import _policy_chunks as chunks\n",
        "from nemokern import _C\n",
        "from .linear_logprobs import mm_fp32\n",
        "from torch._prims_common import _x\n",
    ],
)
def test_public_names_and_private_modules_pass(source):
    module = "nemokern.ops.logprobs" if "_checks" in source else "nemokern.kernels.logprobs"
    assert not private_imports(module, source)
