"""The layering table of docs/architecture.md, enforced: no module imports one above it."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "nemokern"


def layers() -> dict[str, int]:
    """{module prefix: layer} from the table (layer 1 is the top)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `(nemokern[\w.]*)` \|", text, flags=re.MULTILINE)
    assert rows, "docs/architecture.md has no layering table"
    return {name: int(layer) for layer, name in rows}


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of the longest table entry that is `module` or one of its packages."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in table:
            return table[".".join(parts[:n])]
    return None


def imported_modules(module: str, source: str, is_package: bool = False):
    """(line, absolute module name) of every nemokern import in `source`, in functions too."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from nemokern import env` imports nemokern.env
                yield (
                    node.lineno,
                    f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base,
                )


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def upward_imports(module: str, source: str, table: dict[str, int], is_package=False):
    """Messages for each import in `source` that points above `module`'s layer."""
    own = layer_of(module, table)
    assert own is not None, f"{module} is in no row of the layering table"
    found = []
    for line, target in imported_modules(module, source, is_package):
        if not target.startswith("nemokern"):
            continue
        theirs = layer_of(target, table)
        if theirs is None or theirs < own:
            found.append(
                f"{module} (line {line}) imports {target}, layer {theirs} above its "
                f"layer {own} in docs/architecture.md"
            )
    return found


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        is_package = rel.name == "__init__"
        name = ".".join(rel.parts[:-1] if is_package else rel.parts)
        yield name, path, is_package


def test_no_module_imports_upward():
    table = layers()
    problems = []
    for name, path, is_package in package_modules():
        problems += upward_imports(name, path.read_text(), table, is_package)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "from nemokern.ops import logprobs\n",
        "import nemokern.model.llama\n",
        "def f():\n    from ..train import demo\n",  # inside a function, relative
        "from nemokern import cli\n",
    ],
)
def test_a_planted_upward_import_fails(source):
    assert upward_imports("nemokern.kernels.planted", source, layers())


def test_a_planted_module_in_the_tree_fails():
    planted = PACKAGE / "kernels" / "_planted_for_test.py"
    planted.write_text("import torch\n\n\ndef f():\n    from nemokern.parallel import all_reduce\n")
    try:
        with pytest.raises(
            AssertionError,
            match=r"_planted_for_test \(line 5\) imports "
            r"nemokern.parallel",
        ):
            test_no_module_imports_upward()
    finally:
        planted.unlink()


def test_downward_and_same_layer_imports_pass():
    table = layers()
    source = "from . import _checks\nfrom ..kernels import logprobs\nfrom nemokern import env\n"
    assert upward_imports("nemokern.ops.logprobs", source, table) == []
    assert [t for _, t in imported_modules("nemokern.ops.logprobs", source)] == [
        "nemokern.ops._checks",
        "nemokern.kernels.logprobs",
        "nemokern.env",
    ]


def test_no_docstring_restates_the_layering():
    said = [str(p) for _, p, _ in package_modules() if "ust never import" in p.read_text()]
    assert not said, f"the layering test says it once; drop the sentence from {said}"


COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
}


def tensor_collectives(source: str):
    """(line, name) of each torch.distributed tensor collective called as `dist.<name>(...)` or
    `torch.distributed.<name>(...)` in `source`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if node.func.attr in COLLECTIVES and owner in ("dist", "torch.distributed"):
                yield node.lineno, node.func.attr


def test_collectives_go_through_nemokern_parallel():
    """One way to do a collective: outside nemokern.parallel every tensor collective is its
    all_reduce / all_gather / broadcast (object collectives and barriers are not tensor traffic)."""
    found = [
        f"{name} (line {line}) calls torch.distributed.{what}; use nemokern.parallel's"
        for name, path, _ in package_modules()
        if not name.startswith("nemokern.parallel")
        for line, what in tensor_collectives(path.read_text())
    ]
    assert not found, "\n".join(found)
    assert list(tensor_collectives("import torch.distributed as dist\ndist.all_reduce(x)\n"))
