"""Benchmarks:
`python -m pytest bench --benchmark-enable --benchmark-json=bench/results/<name>.json`.

Not part of the default test run (testpaths = tests). Each benchmark records its peak extra memory
in benchmark.extra_info["peak_extra_bytes"] and the device in extra_info["device"].
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# tests/helpers.py: the peak-memory measurement the benchmarks share with the tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def pytest_addoption(parser):
    parser.addoption(
        "--sweep",
        default="full",
        choices=("full", "quick"),
        help="sizes of bench/test_bench_sweep.py: full, or quick (the smallest, a smoke run)",
    )
    parser.addoption(
        "--generate-shape",
        default="8b",
        choices=("8b", "tiny"),
        help="model of bench/test_bench_generate_gpu.py: 8b (Llama-3.1-8B-shaped, needs a GPU), or "
        "tiny (a smoke run, on the CPU when there is no GPU)",
    )


def pytest_runtest_logreport(report):
    from helpers import log_test_report  # tests/helpers.py: the tests' progress log

    log_test_report(report)


@pytest.fixture(autouse=True)
def _progress_log(request):
    """With NEMOKERN_BENCH_LOG=FILE, append each benchmark's record (the entry --benchmark-json
    would hold) to FILE as one JSON line as soon as it has run: a run cut short (gpu_check.sh's
    stage time limits) keeps what finished, where --benchmark-json writes only at the end."""
    yield
    path = os.environ.get("NEMOKERN_BENCH_LOG")
    bench = request.node.funcargs.get("benchmark") if path else None
    if bench is None or getattr(bench, "stats", None) is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(bench.stats.as_dict(), default=str) + "\n")
