"""Build hook for fastsemdiff.

The package metadata lives in pyproject.toml. This file exists for the CUDA C++ extension
(`csrc/` -> `fastsemdiff._C`), which a later milestone adds; until then it builds no extension and
never fails for lack of a CUDA toolchain.
"""
import os

from setuptools import setup


def _cuda_extensions():
    mode = os.environ.get("FASTSEMDIFF_BUILD_CUDA", "auto").lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"FASTSEMDIFF_BUILD_CUDA={mode!r}: use auto, 0 or 1")
    if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")):
        if mode == "1":
            raise SystemExit("FASTSEMDIFF_BUILD_CUDA=1 but there is no csrc/ folder to build")
        print("fastsemdiff: no CUDA extension built (no csrc/ sources in this version)")
    return []


setup(ext_modules=_cuda_extensions())
