"""The Triton kernels' tests on the GPU, compiled (``tests/conftest.py`` picks CUDA tensors when a GPU is
present); in a dry run a slice of each module under the interpreter (CI runs them all)."""
from __future__ import annotations

from ..runner import Check, Stage, pytest_stage

NAME = "kernel-tests"
ORDER = 30
PARALLEL = True
MODULES = ["tests/test_kernel_modulated_layer_norm.py", "tests/test_kernel_gated_residual_norm.py",
           "tests/test_kernel_timestep_embedding.py", "tests/test_kernel_dit_block.py", "tests/test_fused_check.py"]
DRY_SLICE = "BC-plain-torch.float32 or backends_agree or dit_block_triton_equals_torch or warn_falls_back"


def run(check: Check) -> Stage:
    args = [*MODULES, *(["-k", DRY_SLICE] if check.dry_run else [])]
    return pytest_stage(check, NAME, args, check.box(200, 500), parallel=True)
