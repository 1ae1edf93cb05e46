"""Ahead-of-time compilation of every Triton kernel, so that a kernel that would not build on a
GPU fails CI on a machine without one.

Each kernel module in nemokern/kernels/ declares AOT_SPECS: a list of
(jit_fn, signature: dict[str, str], constexprs: dict[str, object][, options]) with the signatures
its launcher actually uses; options (num_warps, num_stages) are the launch's, where it sets them.
Run as `python -m nemokern.kernels._aot` (TRITON_INTERPRET must be unset:
interpreted kernels cannot be compiled). `--resources OUT.json` reports registers, spills and
shared memory per variant: on the GPU at hand, or with `--cc 90` through Triton's ptxas on any
machine.
"""

import importlib
import pkgutil
import sys

# The CUDA driver's spill count (Triton's `n_spills`, from cuFuncGetAttribute's
# LOCAL_SIZE_BYTES / 4) is in 4-byte words; `ptxas -v` reports spill stores in bytes.
SPILL_WORD_BYTES = 4


def iter_specs():
    import nemokern.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"nemokern.kernels.{info.name}")
        for spec in getattr(mod, "AOT_SPECS", ()):
            yield info.name, spec


def compile_all(capabilities=(80, 90), verbose=False):
    """Compile every declared kernel for each CUDA compute capability; return the count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    n = 0
    for modname, (fn, signature, constexprs, *options) in iter_specs():
        for cc in capabilities:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            try:
                triton.compile(
                    src, target=GPUTarget("cuda", cc, 32), options=options[0] if options else None
                )
            except Exception as exc:  # name the kernel: Triton's own message does not
                raise RuntimeError(
                    f"kernel {modname}.{fn.__name__} {constexprs} failed to compile for sm_{cc}: "
                    f"{exc}"
                ) from exc
            n += 1
            if verbose:
                print(f"ok sm_{cc} {modname}.{fn.__name__} {constexprs}")
    return n


def _ptxas_usage(kernel, cc):
    """(registers, spill-store bytes, stack-frame bytes) of a compiled kernel from ptxas -v on its
    PTX: Triton's own ptxas, the one that built the cubin, so no GPU or driver is needed."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if cc >= 90 else ""  # Triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run(
            [get_ptxas(cc).path, "-v", f"--gpu-name=sm_{cc}{suffix}", str(ptx), "-o", f"{ptx}.o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    frame = re.search(r"(\d+) bytes stack frame", out)
    return (
        int(regs.group(1)) if regs else None,
        int(spills.group(1)) if spills else 0,
        int(frame.group(1)) if frame else 0,
    )


def resource_usage(capability=None):
    """Registers per thread, spilled bytes and shared memory of every declared kernel variant.

    capability None: the current CUDA device's, read from the loaded binary (needs a GPU). An
    integer (80, 90, ...): compiled for that target and read from ptxas -v, on any machine.
    Returns one dict per variant: kernel, constexprs, num_warps, registers, spilled_bytes,
    local_bytes, shared_bytes, source ("driver" or "ptxas"). All in bytes per thread: ptxas gives
    spill stores and the stack frame (local memory); the driver gives only the local memory
    size (Triton's n_spills, in 4-byte words, times SPILL_WORD_BYTES), reported as both.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if capability is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        cc = major * 10 + minor
    else:
        cc = capability
    rows = []
    for modname, (fn, signature, constexprs, *options) in iter_specs():
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(
            src, target=GPUTarget("cuda", cc, 32), options=options[0] if options else None
        )
        if capability is None:
            kernel._init_handles()
            regs, words = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
            # the driver's n_spills counts 4-byte words; ptxas -v prints bytes
            spills = frame = None if words is None else SPILL_WORD_BYTES * words
        else:
            regs, spills, frame = _ptxas_usage(kernel, cc)
        rows.append(
            {
                "kernel": f"{modname}.{fn.__name__}",
                "constexprs": {k: str(v) for k, v in constexprs.items()},
                "num_warps": kernel.metadata.num_warps,
                "registers": regs,
                "spilled_bytes": spills,
                "local_bytes": frame,
                "shared_bytes": kernel.metadata.shared,
                "source": "driver" if capability is None else "ptxas",
            }
        )
    return rows


def _main(argv):
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m nemokern.kernels._aot",
        description="Compile every Triton kernel ahead of time for sm_80 and sm_90.",
    )
    ap.add_argument("-v", action="store_true", help="name every compiled variant")
    ap.add_argument(
        "--resources",
        metavar="OUT.json",
        help="write registers, spills and shared memory per kernel variant instead",
    )
    ap.add_argument(
        "--cc",
        type=int,
        metavar="CC",
        help="with --resources: for this compute capability (e.g. 90) through ptxas, no GPU "
        "needed (default: the GPU at hand, from the loaded binaries)",
    )
    args = ap.parse_args(argv)
    if args.cc is not None and not args.resources:
        ap.error("--cc goes with --resources")
    if not args.resources:
        print(f"compiled {compile_all(verbose=args.v)} kernel variants")
        return
    usage = resource_usage(args.cc)
    with open(args.resources, "w") as f:
        json.dump(usage, f, indent=1)
    for r in usage:
        print(
            f"{r['kernel']} {r['constexprs']}: {r['registers']} regs, "
            f"{r['spilled_bytes']} B spilled, {r['local_bytes']} B local, "
            f"{r['shared_bytes']} B shared ({r['source']})"
        )


if __name__ == "__main__":
    _main(sys.argv[1:])
