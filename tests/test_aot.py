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


def test_resource_report_without_a_gpu():
    """`--resources OUT --cc 90` reads registers and spills from ptxas, so the register budget of
    the kernels can be checked on a machine without a GPU."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = (
        "import triton, json\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from nemokern.kernels._aot import _ptxas_usage, iter_specs\n"
        "name, (fn, sig, const, *opt) = next(s for s in iter_specs() if s[0] == 'sequence_kl')\n"
        "k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),\n"
        "                   target=GPUTarget('cuda', 90, 32), options=opt[0] if opt else None)\n"
        "print(json.dumps(_ptxas_usage(k, 90)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    regs, spills, frame = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(regs, int) and 8 <= regs <= 255, regs
    assert spills == frame == 0, (spills, frame)  # one elementwise pass has no reason to spill
    bad = subprocess.run(
        [sys.executable, "-m", "nemokern.kernels._aot", "--cc", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--cc goes with --resources" in bad.stderr


def test_driver_spill_words_are_reported_in_bytes(monkeypatch):
    """On a GPU the figure comes from the driver, whose count (Triton's n_spills) is in 4-byte
    words; ptxas's is in bytes. The report gives bytes either way."""
    import types

    import torch
    import triton

    from nemokern.kernels import _aot

    fake = types.SimpleNamespace(
        n_regs=255,
        n_spills=62,
        _init_handles=lambda: None,
        metadata=types.SimpleNamespace(num_warps=8, shared=49152),
    )
    spec = ("logprobs", (lambda: None, {}, {"BLOCK_V": 4096}))
    spec[1][0].__name__ = "k"
    monkeypatch.setattr(_aot, "iter_specs", lambda: iter([spec]))
    monkeypatch.setattr(triton, "compile", lambda *a, **k: fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr("triton.compiler.ASTSource", lambda **k: None)
    (row,) = _aot.resource_usage()
    assert row["spilled_bytes"] == row["local_bytes"] == 248 and row["source"] == "driver"
