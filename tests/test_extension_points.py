"""TrainLoop is extended through its public methods only (docs: TrainLoop's docstring): no class
in the package overrides one of its private methods, and no module but engine/loop.py calls one
(test_test_plumbing.py checks the benchmarks' calls)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "nemokern"
LOOP = PACKAGE / "engine" / "loop.py"


def private_methods(source: str, cls: str = "TrainLoop") -> set[str]:
    """The names of `cls`'s methods that start with one underscore."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {
                f.name
                for f in node.body
                if isinstance(f, ast.FunctionDef)
                and f.name.startswith("_")
                and not f.name.startswith("__")
            }
    raise AssertionError(f"no class {cls}")


def _base_names(node: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}


def misuses(source: str, private: set[str], subclasses: set[str], where: str) -> list[str]:
    """Each override of a name in `private` by a class deriving from one of `subclasses` (which
    grows by the classes found), and each use of such a name as an attribute (x._train_step,
    super()._reduce) but self.<name> inside a class that is no TrainLoop and defines <name>."""
    found = []

    def visit(node, own: set[str]):
        if isinstance(node, ast.ClassDef):
            methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            if _base_names(node) & subclasses:
                subclasses.add(node.name)
                found.extend(
                    f"{where}: {node.name} overrides TrainLoop.{m}"
                    for m in sorted(methods & private)
                )
                own = set()
            else:
                own = methods
        elif isinstance(node, ast.Attribute) and node.attr in private:
            mine = isinstance(node.value, ast.Name) and node.value.id == "self"
            if not (mine and node.attr in own):
                found.append(f"{where} (line {node.lineno}) uses TrainLoop.{node.attr}")
        for child in ast.iter_child_nodes(node):
            visit(child, own)

    visit(ast.parse(source), set())
    return found


def package_misuses() -> list[str]:
    private = private_methods(LOOP.read_text())
    subclasses = {"TrainLoop"}
    found = []
    for _ in range(2):  # a subclass of a subclass defined in an earlier file
        found = []
        for path in sorted(PACKAGE.rglob("*.py")):
            if path != LOOP:
                found += misuses(path.read_text(), private, subclasses, str(path.relative_to(ROOT)))
    return found


def test_the_package_uses_only_trainloops_public_methods():
    found = package_misuses()
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source, what",
    [
        (
            "class L(TrainLoop):\n    def _train_step(self):\n        return {}\n",
            "L overrides TrainLoop._train_step",
        ),
        (
            "class A(TrainLoop):\n    pass\n\n\nclass B(A):\n    def _reduce(self, v):\n"
            "        return v\n",
            "B overrides TrainLoop._reduce",
        ),
        ("def f(loop):\n    with loop._autocast():\n        pass\n", "uses TrainLoop._autocast"),
        (
            "class L(TrainLoop):\n    def step_record(self, step, m):\n"
            "        return super()._train_step()\n",
            "uses TrainLoop._train_step",
        ),
        (
            "class L(TrainLoop):\n    def step_record(self, step, m):\n"
            "        return self._reduce(m)\n",
            "uses TrainLoop._reduce",
        ),
    ],
)
def test_a_planted_override_or_call_is_found(source, what):
    private = {"_train_step", "_reduce", "_autocast"}
    found = misuses(source, private, {"TrainLoop"}, "planted.py")
    assert any(what in f for f in found), found


def test_a_class_of_its_own_may_use_a_private_name():
    source = "class Other:\n    def _stop(self):\n        pass\n\n    def run(self):\n"
    source += "        self._stop()\n"
    assert misuses(source, {"_stop"}, {"TrainLoop"}, "x.py") == []


def test_the_extension_points_are_public_methods_of_trainloop():
    from nemokern.engine.loop import TrainLoop

    for name in (
        "micro_batches",
        "extra_state",
        "load_extra_state",
        "step_record",
        "nonfinite_note",
        "autocast",
        "sum_over_processes",
        "train_step",
    ):
        assert callable(getattr(TrainLoop, name)), name
        assert f"`{name}" in TrainLoop.__doc__, f"{name} is not in TrainLoop's docstring"
