"""The CUDA extension's tests (``tests/test_csrc_cuda.py``, ``tests/test_csrc_build.py``), after the background
build (build-cuda) has finished."""
from __future__ import annotations

from ..runner import Check, Stage, pytest_stage
from . import build_cuda

NAME = "csrc-tests"
ORDER = 40
MODULES = ["tests/test_csrc_cuda.py", "tests/test_csrc_build.py"]


def run(check: Check) -> Stage:
    build_cuda.wait(check)
    return pytest_stage(check, NAME, MODULES, check.box(90, 300), interpret=False)
