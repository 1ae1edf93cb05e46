"""Benchmarks:
`python -m pytest bench --benchmark-enable --benchmark-json=bench/results/<name>.json`.

Not part of the default test run (testpaths = tests). Each benchmark records its peak extra memory
in benchmark.extra_info["peak_extra_bytes"] and the device in extra_info["device"].
"""

import os
import sys

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
