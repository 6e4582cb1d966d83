"""Builds the compiled operators `detframe._C` from `csrc/` with torch's cpp_extension.

CPU kernels are always built. CUDA kernels are added when nvcc is found and either a GPU is
visible or FORCE_CUDA=1 is set (so a machine without a GPU can still prove that the CUDA
sources compile and link). Project metadata lives in pyproject.toml.
"""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if not (forced or torch.cuda.is_available()):
        return False
    if CUDA_HOME is None:
        if forced:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        return False
    return True


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def _extension():
    sources = _sources("*.cpp") + _sources("ops/*.cpp") + _sources("ops/*/*.cpp")
    # -fopenmp makes at::parallel_for (an inline OpenMP region in torch's headers) run in
    # parallel; the extension then shares the libgomp that torch itself loaded.
    extra = {"cxx": ["-O3", "-fopenmp"]}
    if _want_cuda():
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "detframe._C",
            sources + _sources("ops/cuda/*.cu"),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "detframe._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"]
    )


# The Makefile installs the package with DETFRAME_BUILD_EXT=0 and then compiles the
# extension in place (`setup.py build_ext --inplace`), whose ninja build folder persists, so
# that an edit in csrc/ rebuilds only what changed and a fresh clone compiles only once.
setup(
    ext_modules=[_extension()] if os.environ.get("DETFRAME_BUILD_EXT", "1") != "0" else [],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
