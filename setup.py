"""Builds nemokern._C from csrc/ with pybind11.

The CPU part is always built. The CUDA part is compiled with nvcc when a CUDA toolkit is found
(NEMOKERN_NO_CUDA=1 skips it). This file must never import torch: the extension takes raw
pointers, so it does not need torch headers, and build isolation would not have torch anyway.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _load_env():
    """nemokern.env, the one reader of NEMOKERN_* variables, from this source tree: pip builds in
    an environment where nemokern is not installed. It imports only nemokern.errors (no torch)."""
    sys.path.insert(0, str(ROOT))
    try:
        from nemokern import env
    finally:
        sys.path.remove(str(ROOT))
    return env


env = _load_env()


def find_nvcc():
    if env.flag("NEMOKERN_NO_CUDA"):
        return None
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, cands):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.exists():
            return nvcc
    found = shutil.which("nvcc")
    return Path(found) if found else None


NVCC = find_nvcc()
CUDA_HOME = NVCC.parent.parent if NVCC else None
CU_SOURCES = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
CPP_SOURCES = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
# every csrc file: a changed header or .cu must relink the extension, not only a changed .cpp
DEPENDS = sorted(str(p.relative_to(ROOT)) for p in CSRC.iterdir() if p.is_file())


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc into objects linked into the extension."""

    def build_extension(self, ext):
        if NVCC and CU_SOURCES:
            objs = []
            tmp = Path(self.build_temp) / "cuda"
            tmp.mkdir(parents=True, exist_ok=True)
            archs = env.text("NEMOKERN_CUDA_ARCHS").split(";")
            archs = [a for a in archs if a]
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            # PTX of the newest arch too, so newer GPUs can JIT it instead of failing to load
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
            for src in CU_SOURCES:
                obj = tmp / (Path(src).stem + ".o")
                cmd = [
                    str(NVCC),
                    "-c",
                    src,
                    "-o",
                    str(obj),
                    "-O3",
                    "-std=c++17",
                    "-Xcompiler",
                    "-fPIC",
                    *gencode,
                ]
                print(" ".join(cmd))
                subprocess.check_call(cmd, cwd=ROOT)
                objs.append(str(obj))
            ext.extra_objects = list(ext.extra_objects or []) + objs
        super().build_extension(ext)


macros = [("NEMOKERN_WITH_CUDA", "1" if (NVCC and CU_SOURCES) else "0")]
include_dirs = [str(CSRC)]
library_dirs, libraries = [], ["rt"]
if NVCC and CU_SOURCES:
    include_dirs.append(str(CUDA_HOME / "include"))
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (CUDA_HOME / sub).exists():
            library_dirs.append(str(CUDA_HOME / sub))
    libraries += ["cudart_static", "dl", "pthread"]  # static: imports without a driver

setup(
    ext_modules=[
        Pybind11Extension(
            "nemokern._C",
            CPP_SOURCES,
            depends=DEPENDS,
            define_macros=macros,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=libraries,
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
