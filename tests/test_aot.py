"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed).

Runs in a subprocess: this test session interprets kernels (TRITON_INTERPRET=1), and interpreted
kernels cannot be compiled.
"""
import os
import subprocess
import sys


def test_all_kernels_compile_for_sm80_and_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, "-m", "nemokern.kernels._aot", "-v"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout)
