"""The CUDA extension's tests (``tests/test_csrc_cuda.py``, ``tests/test_csrc_build.py``), after the background
build (build-cuda) has finished. Crash-safe (``gpucheck.crashsafe``): a bad input that segfaults the process
costs that one test; the crashed and the failing tests are named in the JSON and the summary."""
from __future__ import annotations

from ..crashsafe import crash_safe_pytest_stage
from ..runner import Check, Stage
from . import build_cuda

NAME = "csrc-tests"
ORDER = 40
MODULES = ["tests/test_csrc_cuda.py", "tests/test_csrc_build.py"]


def run(check: Check) -> Stage:
    build_cuda.wait(check)
    return crash_safe_pytest_stage(check, NAME, MODULES, check.box(90, 300), interpret=False)
