"""Benchmarks: `python -m pytest bench --benchmark-enable --benchmark-json=bench/results/<name>.json`.

Not part of the default test run (testpaths = tests). Each benchmark records its peak extra memory
in benchmark.extra_info["peak_extra_bytes"] and the device in extra_info["device"].
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
