"""Test files share code through tests/helpers.py only: none imports another test file or
loads bench/ by path. Benchmarks share code through bench/common.py only: none imports a test
file or another bench file."""

import ast
import re
from pathlib import Path

TESTS = Path(__file__).parent
BENCH = TESTS.parent / "bench"


def _imported(path):
    """The top-level names of the modules `path` imports, inside functions too."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return [n.split(".")[0] for n in names]


def test_no_test_file_imports_another_or_bench():
    problems = []
    for path in sorted(set(TESTS.glob("*.py")) - {Path(__file__)}):
        source = path.read_text()
        problems += [
            f"{path.name} imports {n}"
            for n in _imported(path)
            if n.startswith(("test_", "bench")) or n == "common"
        ]
        # running a bench/ shell script (the GPU check's dry run) loads nothing from bench/
        source = re.sub(r"""["']bench["'] / ["'][\w.-]+\.sh["']|bench/[\w.-]+\.sh""", "", source)
        # nor does the `nemokern bench` command pointed at a directory of the test's own
        source = source.replace('["bench", "--bench-dir", str(tmp_path)', "")
        if '"bench"' in source or "'bench'" in source or "bench/" in source:
            problems.append(f"{path.name} names bench/ (load nothing from it)")
    assert not problems, problems


def test_bench_files_import_no_test_file_and_no_other_bench_file():
    """What benchmarks and bench scripts share lives in bench/common.py: a benchmark importing
    another's test file breaks when that one is edited (tests/helpers.py is not a test file)."""
    assert (BENCH / "common.py").is_file()
    others = {p.stem for p in BENCH.glob("*.py")} - {"common"}
    problems = [
        f"bench/{path.name} imports {n}"
        for path in sorted(BENCH.glob("*.py"))
        for n in _imported(path)
        if n.startswith("test_") or n in others
    ]
    assert not problems, f"import shared code from bench/common.py instead: {problems}"


def test_bench_files_call_no_private_trainloop_method():
    """A benchmark drives TrainLoop through its public methods (train_step, fit), as trainers do."""
    loop = ast.parse((TESTS.parent / "nemokern" / "engine" / "loop.py").read_text())
    (cls,) = [n for n in loop.body if isinstance(n, ast.ClassDef) and n.name == "TrainLoop"]
    private = [
        f.name for f in cls.body if isinstance(f, ast.FunctionDef) and re.match(r"_[a-z]", f.name)
    ]
    assert "_train_step" in private
    problems = [
        f"bench/{path.name} calls {name}"
        for path in sorted(BENCH.glob("*.py"))
        for name in private
        if re.search(rf"\.{name}\(", path.read_text())
    ]
    assert not problems, problems


def test_test_processes_leave_their_group_one_way():
    """Every multi-process test leaves its process group through helpers.leave_group (a barrier,
    then destroy): a bare destroy_process_group once aborted a gloo process whose worker thread
    still held a collective's tensors."""
    problems = [
        path.name
        for path in sorted(set(TESTS.glob("*.py")) - {Path(__file__), TESTS / "helpers.py"})
        if "destroy_process_group(" in path.read_text() or "mp.spawn(" in path.read_text()
    ]
    assert not problems, (
        "start processes with helpers.run_ranks (or launch_script) and leave with "
        f"helpers.leave_group, not mp.spawn / destroy_process_group: {problems}"
    )
