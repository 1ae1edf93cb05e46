"""The layering table of docs/architecture.md, enforced: no module imports one above it."""

import ast
import re
from pathlib import Path

import pytest

from helpers import import_from_base, is_module, package_modules

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
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = import_from_base(module, node, is_package)
            for alias in node.names:  # `from nemokern import env` imports nemokern.env
                yield (
                    node.lineno,
                    f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base,
                )


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


def import_graph() -> dict[str, set[str]]:
    """{module: the nemokern modules it imports (in functions too)} for every module."""
    return {
        name: {t for _, t in imported_modules(name, path.read_text(), is_package)} - {name}
        for name, path, is_package in package_modules()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that import one another (directly or round a loop), sorted."""
    reach = {name: set() for name in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            name = todo.pop()
            if name in graph and name not in reach[start]:
                reach[start].add(name)
                todo += graph[name]
    groups = {frozenset(n for n in reach[m] if m in reach[n]) for m in graph if m in reach[m]}
    return sorted(sorted(g) for g in groups)


def test_no_import_cycles():
    """No two modules import each other, round any loop, at module level or inside functions:
    what two modules share belongs in a third that both import."""
    assert import_cycles(import_graph()) == []


def test_a_planted_import_cycle_fails():
    """An import inside a function closes a loop as much as one at the top."""
    graph = import_graph()
    source = "def f():\n    from nemokern.engine import checkpoint\n"
    graph["nemokern.parallel.fsdp"] |= {
        t for _, t in imported_modules("nemokern.parallel.fsdp", source)
    }
    pair = {"nemokern.engine.checkpoint", "nemokern.parallel.fsdp"}
    assert any(pair <= set(cycle) for cycle in import_cycles(graph))
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


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
