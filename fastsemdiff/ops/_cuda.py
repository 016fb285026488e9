"""The optional CUDA C++ extension ``fastsemdiff._C`` (sources in ``csrc/``, built by setup.py).

Importing this module imports nothing; :func:`load` imports the extension once, on first use, and never
raises: where it was not built, or does not load (for instance it was built against another torch
version), :func:`load` returns None and :func:`unavailable_reason` says why in one line. It only loads:
which inputs go to these kernels is decided in ``fastsemdiff.ops.dispatch``.

The ops (``torch.ops.fastsemdiff_C.<name>``, registered with ``TORCH_LIBRARY``: CUDA kernels, Meta kernels
for torch.compile / FakeTensor, and a CPU kernel that raises a clear error):

* ``mln_fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms) -> (y, mean, rstd)``
* ``mln_bwd(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms)
  -> (dx, dshift, dscale, dweight, dbias)``
* ``grmln_fwd(x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms) -> (x_out, y, mean, rstd)``
* ``grmln_bwd(dx_out, dy, x_out, h, gate, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms)
  -> (dx, dh, dgate, dshift, dscale, dweight, dbias)``
* ``timestep_embedding(t, dim, max_period) -> emb`` (fp32 ``[B, dim]``)

Rows are ``x`` viewed as ``[M, C]``; ``shift``/``scale``/``gate`` are ``[M // tokens_per_mod_row, C]``
(``tokens_per_mod_row`` = N for per-sample modulation, 1 for per-token). ``dweight``/``dbias`` are empty
fp32 ``[0]`` tensors where that parameter is None. Limits of the norm ops (anything else raises a
RuntimeError; ``fastsemdiff.ops.dispatch`` checks them beforehand and sends other inputs to Triton):
C a multiple of 8 and at most 8192; x float32, float16 or bfloat16; each [rows, C] operand with unit column
stride (otherwise it is copied) starting at a 16-byte aligned address with a row stride of a multiple of
16 bytes. Operands of another float dtype than x are converted to fresh tensors first (h, dy, dx_out to
x's dtype, dh back to h's; the modulation to fp32 when not all of it has x's dtype); weight/bias any float
dtype. Outputs: y, x_out, dx in x's dtype; dshift/dscale in scale's, dgate in gate's, dweight/dbias in
the parameter's dtype.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator, Optional

OPS = ("mln_fwd", "mln_bwd", "grmln_fwd", "grmln_bwd", "timestep_embedding")

# The norm kernels' variants (csrc/adaln.cu, "variant selection"); -1 is the table's choice there, which is the
# baseline (0) until a GPU run shows a rows variant correct and faster.
FWD_VARIANTS = {0: "baseline: a team of ceil(C / 8) threads per row",
                1: "rows: one row per warp, persistent grid, the next row prefetched (C <= 1280)"}
BWD_VARIANTS = {0: "baseline: row ranges per sample, one row at a time",
                1: "rows: persistent grid, 4-row tiles (gated op: 2), segment partial sums + finishing kernel "
                   "(C <= 1536)",
                2: "rows: as 1 with 2-row tiles"}
# (fwd, bwd) pairs the tests run every norm check under: each variant at least once.
TEST_VARIANTS = {"baseline": (0, 0), "rows-tile4": (1, 1), "rows-tile2": (1, 2)}

_loaded = False
_ops = None
_reason: Optional[str] = None


def _import():
    import torch  # the extension links against torch's libraries: load them first

    try:
        importlib.import_module("fastsemdiff._C")  # registers the ops as a side effect
    except ModuleNotFoundError as e:
        if e.name != "fastsemdiff._C":
            raise
        return None, ("fastsemdiff._C was not built (no CUDA toolchain at install time, or "
                      "FASTSEMDIFF_BUILD_CUDA=0); build it with `pip install --no-build-isolation -e .` where nvcc "
                      "and a CUDA build of torch are present")
    except (ImportError, OSError) as e:
        return None, (f"fastsemdiff._C does not load with torch {torch.__version__} (built for another torch? "
                      f"rebuild with `pip install --no-build-isolation -e .`): {e}")
    namespace = torch.ops.fastsemdiff_C
    missing = [name for name in OPS if not hasattr(namespace, name)]
    if missing:
        return None, f"fastsemdiff._C lacks the ops {missing}: rebuild it"
    return namespace, None


def load():
    """``torch.ops.fastsemdiff_C`` when the extension is built and loads, else None (see unavailable_reason)."""
    global _loaded, _ops, _reason
    if not _loaded:
        try:
            _ops, _reason = _import()
        except Exception as e:  # never let an optional extension break the package
            _ops, _reason = None, f"importing fastsemdiff._C failed: {type(e).__name__}: {e}"
        _loaded = True
    return _ops


def available() -> bool:
    """Whether the CUDA extension's ops can be called (it does not check for a GPU)."""
    return load() is not None


def unavailable_reason() -> Optional[str]:
    """One line on why the extension cannot be used, or None when it can."""
    load()
    return _reason



@contextlib.contextmanager
def norm_variants(fwd: int = -1, bwd: int = -1, blocks_per_sm: int = 0) -> Iterator[None]:
    """Within it the CUDA norm ops run the given kernel variants (FWD_VARIANTS, BWD_VARIANTS; -1: the table's
    choice) with persistent grids sized for ``blocks_per_sm`` resident blocks (0: the occupancy calculator's
    figure). Process-wide, not thread-local: for tests and the tuner. Outside the context (or with
    FASTSEMDIFF_CUDA_NORM_CONFIG="fwd,bwd[,blocks_per_sm]" in the environment) the table decides."""
    ops = load()
    if ops is None or not hasattr(ops, "norm_config"):
        raise RuntimeError(unavailable_reason() or "fastsemdiff._C has no norm_config op: rebuild it")
    previous = ops.norm_config(fwd, bwd, blocks_per_sm)
    try:
        yield
    finally:
        ops.norm_config(*previous)
