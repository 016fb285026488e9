"""Build hook for fastsemdiff: the optional CUDA C++ extension ``fastsemdiff._C`` (sources in ``csrc/``).

The package metadata lives in pyproject.toml. ``FASTSEMDIFF_BUILD_CUDA`` decides the extension:

* ``auto`` (default): build it when torch is importable in the build environment, is a CUDA build, and
  nvcc is found (``$CUDA_HOME/bin/nvcc`` when CUDA_HOME or CUDA_PATH is set, else ``/usr/local/cuda``,
  else nvcc on PATH) with the same CUDA major version as torch; otherwise print one line saying why and
  build nothing (the Triton and torch backends serve).
* ``1``: build it, or fail with that reason.
* ``0``: never build it.

``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` (Ampere and Hopper). The build needs torch in the build
environment, so install with ``pip install --no-build-isolation -e .`` (scripts/setup.sh does); under pip's
default build isolation torch is not importable and ``auto`` builds nothing, saying so.
"""
import glob
import os
import re
import shutil
import subprocess
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "fastsemdiff._C"
SOURCES = ["csrc/ops.cpp", "csrc/adaln.cu", "csrc/timestep_embedding.cu"]
DEFAULT_ARCH_LIST = "8.0;9.0"


def _say(message: str) -> None:
    print(f"fastsemdiff: {message}", flush=True)


class _NoBuild(Exception):
    """Why the extension is not built (one line)."""


def _cuda_home() -> str:
    """The CUDA toolkit to build with; an explicit CUDA_HOME/CUDA_PATH is taken as it is."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "bin", "nvcc")):
            raise _NoBuild(f"CUDA_HOME={explicit} has no bin/nvcc")
        return explicit
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise _NoBuild("no nvcc found (set CUDA_HOME, or put nvcc on PATH)")
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        raise _NoBuild(f"nvcc at {nvcc} is not inside a CUDA toolkit folder; set CUDA_HOME")
    return home


def _nvcc_version(cuda_home: str) -> str:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _NoBuild(f"nvcc in {cuda_home} does not run ({e})") from None
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        raise _NoBuild(f"cannot read the version of nvcc in {cuda_home}")
    return f"{match.group(1)}.{match.group(2)}"


def _nvidia_wheel_includes() -> list:
    """Include folders of the nvidia-* wheels that hold the CUDA library headers ATen's CUDA headers include
    (cuBLAS, cuSPARSE, cuSOLVER, cuRAND, cuFFT) when the toolkit in CUDA_HOME lacks them."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels that a CUDA build of torch depends on
    except ImportError:
        return []
    wanted = ("cublas_v2.h", "cusparse.h", "cusolverDn.h", "curand.h", "cufft.h")
    found = []
    for root in list(getattr(nvidia, "__path__", [])):
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if include not in found and any(os.path.isfile(os.path.join(include, h)) for h in wanted):
                found.append(include)
    return found


def _cuda_extensions():
    mode = os.environ.get("FASTSEMDIFF_BUILD_CUDA", "auto").lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"FASTSEMDIFF_BUILD_CUDA={mode!r}: use auto, 0 or 1")
    if mode == "0":
        _say("no CUDA extension built (FASTSEMDIFF_BUILD_CUDA=0)")
        return [], {}
    try:
        if not all(os.path.isfile(os.path.join(ROOT, s)) for s in SOURCES):
            raise _NoBuild("no csrc/ sources in this tree")
        try:
            import torch
        except ImportError:
            raise _NoBuild("torch is not importable in the build environment (pip's build isolation? "
                           "install with --no-build-isolation)") from None
        if not torch.version.cuda:
            raise _NoBuild(f"torch {torch.__version__} is not a CUDA build")
        cuda_home = _cuda_home()
        nvcc_version = _nvcc_version(cuda_home)
        if nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
            raise _NoBuild(f"nvcc {nvcc_version} in {cuda_home} does not match torch's CUDA {torch.version.cuda}")
    except _NoBuild as why:
        if mode == "1":
            raise SystemExit(f"fastsemdiff: FASTSEMDIFF_BUILD_CUDA=1 but cannot build {EXT_NAME}: {why}")
        _say(f"no CUDA extension built ({why}); the triton and torch backends serve")
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name=EXT_NAME,
        sources=SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    # After torch's and the toolkit's own include folders, so the toolkit's headers win where both have one.
    ext.include_dirs.extend(_nvidia_wheel_includes())

    class Build(BuildExtension):
        def run(self):
            start = time.time()
            _say(f"building {EXT_NAME} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} with nvcc "
                 f"{nvcc_version} ({cuda_home}), torch {torch.__version__}")
            super().run()
            _say(f"built {EXT_NAME} in {time.time() - start:.0f} s")

    return [ext], {"build_ext": Build}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
