"""Builds proxykern._C: the C++ CPU kernel always; the CUDA sources (csrc/*.cu) too when
torch is a CUDA build and nvcc is found (PROXYKERN_SKIP_CUDA=1 skips them).

CUDA architectures: PROXYKERN_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the visible
GPUs' own architectures plus PTX (e.g. "8.0+PTX" on an A100, "8.9+PTX" on an L40S),
else -- no GPU visible -- "9.0+PTX" (so a machine without a GPU still compiles and links
the CUDA code, for CI; the PTX lets newer GPUs JIT it). At run time ``backend="auto"``
checks that the build holds an image the device can run, and falls back to Triton with
one warning otherwise.

Units: csrc/*.cpp (CPU kernel, op schema, module) always; with CUDA also
csrc/cuda_*.cpp (launcher, registration) and csrc/*.cu (the kernels, one unit per
dtype, with no torch headers), which ninja compiles in parallel (MAX_JOBS).
"""
import glob
import os
import sys
import sysconfig

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> tuple[bool, str]:
    if os.environ.get("PROXYKERN_SKIP_CUDA") == "1":
        return False, "PROXYKERN_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if cpp_extension.CUDA_HOME is None or not os.path.exists(
            os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda}, nvcc in {cpp_extension.CUDA_HOME}"


def _cuda_archs() -> str:
    """The architectures to build for (see the module docstring)."""
    given = os.environ.get("PROXYKERN_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if given:
        return given
    try:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # no driver, or no GPU visible: not an error for a build
        caps = []
    if not caps:
        return "9.0+PTX"
    return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"


def _wheel_cuda_includes() -> list[str]:
    """The CUDA headers that torch's cu13 wheels ship (cuBLAS, cuSPARSE, ...), if present."""
    site = sysconfig.get_paths()["purelib"]
    return [p for p in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(p)]


def _extension():
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
                 "-fno-ipa-modref",  # insurance against a GCC 12 wrong-code bug (see csrc/proxy_sample_cpu.cpp)
                 "-Wall", "-Wno-unused-function"]
    cuda_host = sorted(glob.glob("csrc/cuda_*.cpp"))
    sources = [p for p in sorted(glob.glob("csrc/*.cpp")) if p not in cuda_host]
    use_cuda, why = _cuda_wanted()
    print(f"proxykern: CUDA kernels {'ON' if use_cuda else 'OFF'} ({why})", file=sys.stderr)
    common = dict(name="proxykern._C", include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_link_args=["-fopenmp"])
    if not use_cuda:
        return cpp_extension.CppExtension(sources=sources,
                                          extra_compile_args={"cxx": cxx_flags}, **common)
    archs = _cuda_archs()
    print(f"proxykern: CUDA architectures {archs}", file=sys.stderr)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    arch_tag = "".join(c if c.isalnum() or c in ".+" else "_" for c in archs.strip())
    common["include_dirs"] += _wheel_cuda_includes()
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                  "-fmad=false" if os.environ.get("PROXYKERN_NO_FMAD") == "1" else "-fmad=true"]
    return cpp_extension.CUDAExtension(
        sources=sources + cuda_host + sorted(glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": cxx_flags + ["-DPROXYKERN_WITH_CUDA",
                                                f"-DPROXYKERN_CUDA_ARCHS={arch_tag}"],
                            "nvcc": nvcc_flags},
        **common)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
