"""The prepared GPU check: install, CUDA correctness and the benchmarks in one time-boxed command.

    python scripts/gpu_check.py --out DIR                      # on a machine with one NVIDIA GPU, ~8 minutes
    python scripts/gpu_check.py --dry-run --out DIR            # every stage on the CPU at tiny shapes
    python scripts/gpu_check.py --out DIR --only csrc-tests    # just the named stages (environment always runs)
    python scripts/gpu_check.py --out DIR --budget 300         # a shorter budget: the last stages are skipped

The stages are the modules of ``scripts/gpucheck/stages/``, run in their ORDER by ``scripts/gpucheck/runner.py``
(which says what is dropped first when time runs short). Written to DIR (at most 8 files, for the device tool):
``gpu_check.json`` (everything), ``bench.json`` (the merged pytest-benchmark JSON), ``tables.md``,
``summary.txt`` (one screen, also printed last) and ``logs.txt`` (every stage's output). Scratch (training runs,
per-stage JSONs) goes to ``--work``. ``--dry-run`` proves the plumbing on the CPU, not the figures: the install as
``pip install --dry-run``, no CUDA build, the kernels under the Triton interpreter, a tiny model, a few training
steps, the CPU benchmark cases for two rounds with torch.compile off.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpucheck package beside this file

from gpucheck.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
