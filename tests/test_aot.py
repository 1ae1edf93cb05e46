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
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # every kernel module is covered, for both targets (a module without AOT_SPECS fails here)
    import pkgutil

    import nemokern.kernels as pkg

    modules = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    assert modules, "no kernel modules found"
    for name in modules:
        for cc in (80, 90):
            assert f"ok sm_{cc} {name}." in out.stdout, (
                f"kernels/{name}.py: nothing compiled for sm_{cc}"
            )
