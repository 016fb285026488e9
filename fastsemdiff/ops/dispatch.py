"""Which backend runs one call of a fused op. This module alone decides; layers and ops only ask it.

Backends (``model.backend``, the layers' ``backend=``):

* ``torch``: the plain-PyTorch reference that defines each op's meaning (beside its op in this package);
* ``triton``: the Triton kernels (``fastsemdiff.kernels``); CPU tensors run them only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported);
* ``cuda``: the CUDA C++ kernels (``fastsemdiff._C``, built from ``csrc/``) where they take the input;
* ``auto``: per op, the backend the measured table names for CUDA tensors of the device's class, torch
  elsewhere.

:func:`choose_backend` applies the rules, in this order, as a pure function of the facts (so every rule is
tested on any machine):

1. ``torch`` runs torch.
2. An explicit request nothing can serve raises, naming the fix: ``triton`` without the triton package,
   ``cuda`` without a loadable ``fastsemdiff._C``.
3. An input the fused op is not written for runs torch: another rank than the layer hands the op
   (``[B, N, C]`` for the norms, ``[B]`` for the embedding), or a dtype its kernels do not compute in
   (fp64 norms: the kernels would silently compute them in fp32).
4. ``auto`` runs torch off CUDA (and where the device is unknown); on CUDA the op's entry of
   ``AUTO_MEASURED`` for the device's class (``sm_90``: compute capability 9.0), else of
   ``AUTO_UNMEASURED``.
5. ``cuda`` (asked for, or picked by ``auto``) where the CUDA kernels do not take the input (not a CUDA
   tensor, another dtype, C not a multiple of 8 or above 8192, rows not 16-byte aligned) runs Triton;
6. and Triton where it is not installed, or a row is wider than its kernels hold (C > 65536), runs torch.

Each call is decided twice, with the facts each moment has. The layer asks (:func:`resolve_backend`) when
its forward runs or is traced by ``torch.compile``: device, dtype and shape, but not addresses (fake
tensors have none), so ``cuda`` is chosen there on the hope of aligned rows. The custom op asks again
(:func:`launch_backend`) when it executes on real tensors, where the alignment of every row operand is
known. After that only the first-use check (``fastsemdiff.ops.guard``) may still send a configuration to
torch: a kernel that disagrees with the reference.
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
FUSED = ("triton", "cuda")  # what a fused op (``fastsemdiff.ops``) can be asked to run on
NORM_OPS = ("modulated_layer_norm", "gated_residual_modulated_norm")
OPS = (*NORM_OPS, "timestep_embedding")

# What ``auto`` picks on CUDA tensors, per device class (``sm_<major><minor>``, the compute capability) and op:
# the fastest of torch_compile / triton / cuda in the op's forward_backward group at the target shape (what a
# training step runs), from a GPU run recorded in bench/RESULTS.md (bench/test_bench_adaln.py: mln ->
# modulated_layer_norm, grmln -> gated_residual_modulated_norm, [256, 256, 1152] bf16;
# bench/test_bench_timestep_embedding.py: forward, t [256] x 256). tests/test_dispatch.py parses RESULTS.md and
# fails when a row here and the record disagree.
# sm_90: NVIDIA H200, 2026-12-04, commit 22e0937. The compiled reference beat both kernels in fwd+bwd
# (modulated LN 634.7 us against triton 960.0 / cuda 1,024.4; gated residual + LN 808.9 against 1,915.3 /
# 1,287.6; timestep embedding 68.5 against 117.6 / 69.0), so ``auto`` runs the reference there.
AUTO_MEASURED: dict[str, dict[str, str]] = {
    "sm_90": {"modulated_layer_norm": "torch", "gated_residual_modulated_norm": "torch",
              "timestep_embedding": "torch"},
}
# What ``auto`` picks on a CUDA device class that no run has measured: torch for every op. The kernels are the
# same code on every class, and the one class measured (sm_90, the class they were written for) ran the
# compiled reference faster in fwd+bwd; picking them elsewhere without a measurement would be hope. A GPU run of
# another class (scripts/gpu_check.py) that shows a kernel ahead adds that class's row to AUTO_MEASURED.
AUTO_UNMEASURED: dict[str, str] = {"modulated_layer_norm": "torch", "gated_residual_modulated_norm": "torch",
                                   "timestep_embedding": "torch"}

# Looked up once without importing Triton (importing it is slow and, on CPU, decides the interpreter mode).
TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None

# The dtypes each op's kernels compute in (their statistics and sums are fp32); others run torch. The timestep
# embedding is fp32 whatever t's dtype, in the reference too, so any float t may use it.
LOW_AND_FP32 = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "modulated_layer_norm": LOW_AND_FP32,
    "gated_residual_modulated_norm": LOW_AND_FP32,
    "timestep_embedding": (*LOW_AND_FP32, torch.float64),
}
LAYER_RANK = {"modulated_layer_norm": 3, "gated_residual_modulated_norm": 3, "timestep_embedding": 1}

# The row limits of the kernels (the norms; the embedding has none): csrc/common.h and
# kernels/modulated_layer_norm.py (tests/test_dispatch.py checks that they agree).
CUDA_CHANNEL_MULTIPLE = 8  # rows move in 16-byte vectors: 8 x bf16/fp16, 2 x 4 x fp32
CUDA_MAX_CHANNELS = 8192  # one row in registers, 8 elements per thread, at most 1024 threads
CUDA_VECTOR_BYTES = 16
TRITON_MAX_CHANNELS = 65536  # next_power_of_2(C) lanes of one program


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not available; choose one of {BACKENDS}")
    return backend


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"no fused op {op!r}; the fused ops are {OPS}")


def cuda_refusal(op: str, device_type: Optional[str], dtype: Optional[torch.dtype] = None,
                 channels: Optional[int] = None, aligned: Optional[bool] = None) -> Optional[str]:
    """Why the CUDA kernels of ``op`` do not take such an input, or None when they do. A fact given as None
    is unknown and refuses nothing."""
    if device_type is not None and device_type != "cuda":
        return f"the CUDA kernels take CUDA tensors, not {device_type} ones"
    if op == "timestep_embedding":
        return None
    if dtype is not None and dtype not in LOW_AND_FP32:
        return f"x is {dtype}; the CUDA kernels take float32, float16 or bfloat16"
    if channels is not None and (channels <= 0 or channels % CUDA_CHANNEL_MULTIPLE):
        return f"C={channels} is not a positive multiple of {CUDA_CHANNEL_MULTIPLE}"
    if channels is not None and channels > CUDA_MAX_CHANNELS:
        return f"C={channels} exceeds {CUDA_MAX_CHANNELS}"
    if aligned is False:
        return "an operand is not 16-byte aligned (start address or row stride)"
    return None


def choose_backend(requested: str, op: str, device_type: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                   channels: Optional[int] = None, aligned: Optional[bool] = None, *, ndim: Optional[int] = None,
                   triton_available: bool, cuda_available: bool,
                   cuda_reason: str = "fastsemdiff._C is not available",
                   measured: Optional[dict[str, str]] = None,
                   unmeasured: Optional[dict[str, str]] = None) -> str:
    """The backend (``torch``, ``triton`` or ``cuda``) that runs one call of ``op``, by the module's rules.

    Facts given as None are unknown: ``device_type`` (no tensor), ``ndim`` (not a layer's input: the op's own
    rows), ``aligned`` (trace time). ``measured`` is the table ``auto`` reads for the device's class (a row
    of ``AUTO_MEASURED``: op -> backend), ``unmeasured`` its default (``AUTO_UNMEASURED``).
    """
    check_backend(requested)
    _check_op(op)
    if requested == "torch":
        return "torch"
    if requested == "triton" and not triton_available:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'fastsemdiff[triton]'); "
                           "use backend='torch' or 'auto'")
    if requested == "cuda" and not cuda_available:
        raise RuntimeError(f"backend='cuda': {cuda_reason}; or use backend='triton' or 'auto'")
    if ndim is not None and ndim != LAYER_RANK[op]:
        return "torch"
    if dtype is not None and dtype not in KERNEL_DTYPES[op]:
        return "torch"
    pick = requested
    if requested == "auto":
        if device_type != "cuda":
            return "torch"
        pick = (measured or {}).get(op) or (AUTO_UNMEASURED if unmeasured is None else unmeasured).get(op, "torch")
        if pick == "cuda" and not cuda_available:
            pick = "triton"
    if pick == "cuda" and cuda_refusal(op, device_type, dtype, channels, aligned) is not None:
        pick = "triton"
    if pick == "triton" and (not triton_available or (op in NORM_OPS and channels is not None
                                                      and channels > TRITON_MAX_CHANNELS)):
        return "torch"
    return pick


def aligned_rows(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether the CUDA kernels can read ``x`` and the other row operands (each viewed as ``[rows, C]``) in
    16-byte vectors: every start address and row stride a multiple of 16 bytes. Operands of another dtype
    than x, empty ones and ones without unit column stride are copied to fresh tensors by the op, so they
    pass. Reads data pointers: call it on real tensors, not while ``torch.compile`` traces."""
    for t in (x, *others):
        if t is None or t.dtype != x.dtype or t.numel() == 0 or (t.dim() >= 1 and t.stride(-1) != 1):
            continue
        if t.data_ptr() % CUDA_VECTOR_BYTES:
            return False
        if any(t.stride(d) * t.element_size() % CUDA_VECTOR_BYTES for d in range(t.dim() - 1) if t.shape[d] > 1):
            return False
    return True


def device_class(device: torch.device) -> Optional[str]:
    """The class ``auto``'s measured table is keyed by (``sm_90``: compute capability 9.0), or None off CUDA and
    without a CUDA driver (fake CUDA tensors on a CPU machine). ``torch.compile`` folds both calls into
    constants while it traces (and nothing here imports its machinery, which would import Triton early)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return f"sm_{props.major}{props.minor}"


def measured_for(device: Optional[torch.device]) -> dict[str, str]:
    """The row of ``AUTO_MEASURED`` for ``device``'s class (op -> backend); empty where no run measured it."""
    cls = device_class(device) if device is not None else None
    return AUTO_MEASURED.get(cls, {}) if cls else {}


def _cuda_facts(requested: str, op: str, measured: dict[str, str]) -> tuple[bool, str]:
    """Whether ``fastsemdiff._C`` loads (and why not), looked up only where the answer matters, since it
    imports the extension."""
    if requested != "cuda" and not (requested == "auto" and measured.get(op) == "cuda"):
        return False, ""
    from . import _cuda

    return _cuda.available(), _cuda.unavailable_reason() or ""


def _width(op: str, x: torch.Tensor) -> Optional[int]:
    return x.shape[-1] if op in NORM_OPS and x.dim() > 0 else None


def resolve_backend(requested: str, op: str, x: Optional[torch.Tensor] = None) -> str:
    """The backend a layer runs ``op`` on for input ``x`` (its device, dtype and shape; without ``x`` the
    device is unknown and ``auto`` means torch). Works on fake tensors, so ``torch.compile`` traces it."""
    check_backend(requested)
    known = x is not None
    measured = measured_for(x.device) if known and requested == "auto" else {}
    cuda_available, reason = _cuda_facts(requested, op, measured)
    return choose_backend(requested, op, x.device.type if known else None, x.dtype if known else None,
                          _width(op, x) if known else None, None, ndim=x.dim() if known else None,
                          triton_available=TRITON_AVAILABLE, cuda_available=cuda_available, cuda_reason=reason,
                          measured=measured)


def launch_backend(requested: str, op: str, x: torch.Tensor, operands: Sequence[Optional[torch.Tensor]] = ()) -> str:
    """The kernels a fused op's implementation launches for real tensors: ``x`` (the op's rows) and its other
    row operands (checked for 16-byte alignment when ``cuda`` is asked for). ``torch`` means the op's
    plain-PyTorch launchers."""
    if requested not in FUSED:
        raise ValueError(f"fused {op}: backend={requested!r} is not a fused backend; choose one of {FUSED} "
                         "(the layers of fastsemdiff.nn take 'auto' and 'torch')")
    cuda_available, reason = _cuda_facts(requested, op, {})
    aligned = aligned_rows(x, *operands) if requested == "cuda" and cuda_available else None
    return choose_backend(requested, op, x.device.type, x.dtype, _width(op, x), aligned,
                          triton_available=TRITON_AVAILABLE, cuda_available=cuda_available, cuda_reason=reason)
