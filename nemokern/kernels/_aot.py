"""Ahead-of-time compilation of every Triton kernel, so that a kernel that would not build on a
GPU fails CI on a machine without one.

Each kernel module in nemokern/kernels/ declares AOT_SPECS: a list of
(jit_fn, signature: dict[str, str], constexprs: dict[str, object][, options]) with the signatures
its launcher actually uses; options (num_warps, num_stages) are the launch's, where it sets them.
Run as `python -m nemokern.kernels._aot` (TRITON_INTERPRET must be unset:
interpreted kernels cannot be compiled).
"""

import importlib
import pkgutil
import sys


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


def resource_usage():
    """Compile every declared kernel for the current CUDA device and load it (needs a GPU).

    Returns one dict per variant: kernel, constexprs, registers per thread, spilled bytes and
    shared memory bytes as the loaded binary reports them.
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    major, minor = torch.cuda.get_device_capability()
    rows = []
    for modname, (fn, signature, constexprs, *options) in iter_specs():
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", major * 10 + minor, 32),
            options=options[0] if options else None,
        )
        kernel._init_handles()
        rows.append(
            {
                "kernel": f"{modname}.{fn.__name__}",
                "constexprs": {k: str(v) for k, v in constexprs.items()},
                "num_warps": kernel.metadata.num_warps,
                "registers": getattr(kernel, "n_regs", None),
                "spilled_bytes": getattr(kernel, "n_spills", None),
                "shared_bytes": kernel.metadata.shared,
            }
        )
    return rows


if __name__ == "__main__":
    if "--resources" in sys.argv:  # `--resources OUT.json`: registers and spills on this GPU
        import json

        usage = resource_usage()
        with open(sys.argv[sys.argv.index("--resources") + 1], "w") as f:
            json.dump(usage, f, indent=1)
        for r in usage:
            print(
                f"{r['kernel']} {r['constexprs']}: {r['registers']} regs, "
                f"{r['spilled_bytes']} B spilled, {r['shared_bytes']} B shared"
            )
        sys.exit(0)
    count = compile_all(verbose="-v" in sys.argv)
    print(f"compiled {count} kernel variants")
