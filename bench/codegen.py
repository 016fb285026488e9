"""What the fused kernels compile to, read on a machine without a GPU (for the codegen tests and the table in
bench/RESULTS.md).

An inspection tool, not part of the runtime package: training never imports it, so it lives beside its
users (``bench/codegen_table.py``; ``tests/test_codegen.py`` loads it from this file). It inspects whichever
fastsemdiff the calling interpreter imports (the checkout, or an installed copy), and its compiling half runs
as ``python bench/codegen.py --what triton|cuda|all [--json rows.json]`` (``run_in_subprocess``).

A kernel's speed on a GPU is decided by facts that are fixed at compile time: registers per thread (how many
blocks fit on an SM), spills to local memory or a stack frame, and the width of every global load and store.
This module reads them from compiled code, with no GPU:

* Triton kernels: the launchers of ``fastsemdiff.kernels`` are run on a *stand-in for the driver*, in a
  process without the Triton interpreter, so they pass exactly what they pass on a GPU (``RNE=False``, their
  grid and num_warps); their kernels are replaced by recorders that keep the launch instead of running it. Tensors are meta tensors shaped and strided as the
  ops layer makes them; their addresses are those of a CUDA caching-allocator block (512-byte aligned) plus
  the view's storage offset, so a chunked modulation view keeps its real alignment. The launch is then
  specialised by triton's own binder (``create_function_from_signature`` and ``JITFunction._pack_args``, as
  ``JITFunction.run`` does it on triton 3.6 and 3.8: pointer, stride and size divisibility by 16, ints equal
  to 1) and compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.
* The built ``fastsemdiff._C``: its cubins for sm_80 and sm_90 are read directly.

Both are read with ``cuobjdump`` (shipped with triton in ``triton/backends/nvidia/bin``):
``--dump-resource-usage`` for registers, stack and local memory, ``-sass`` for the global accesses.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ARCHS = (80, 90)
DIT_WIDTHS = (384, 768, 1024, 1152)
ODD_WIDTH = 100  # not a multiple of 8: the masked path
WIDTHS = (*DIT_WIDTHS, ODD_WIDTH)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FREQ_DIM = 256  # DiT's frequency-embedding size, the timestep kernel's width in the models

ALLOCATION_ALIGNMENT = 512  # the CUDA caching allocator hands out 512-byte aligned blocks
_BASE_ADDRESS = 1 << 32


@dataclass(frozen=True)
class SM:
    """Per-SM limits that decide how many blocks are resident (CUDA programming guide, compute capability table)."""
    name: str
    sm_count: int  # of the GPU the grid is sized for: A100 (sm_80), H100/H200 (sm_90)
    regs: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    max_threads: int = 2048
    max_blocks: int = 32
    shared: int = 0  # bytes per SM usable by blocks
    shared_reserved: int = 1024  # reserved per block by the runtime


SMS = {80: SM("sm_80 (A100)", 108, shared=164 * 1024), 90: SM("sm_90 (H100/H200)", 132, shared=228 * 1024)}


def blocks_per_sm(arch: int, regs: int, threads: int, shared: int = 0) -> int:
    """Resident blocks per SM allowed by registers, threads, shared memory and the block limit."""
    sm = SMS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / sm.reg_unit) * sm.reg_unit
    by_regs = (sm.regs // regs_per_warp) // warps
    by_threads = sm.max_threads // (warps * 32)
    by_shared = sm.shared // (shared + sm.shared_reserved)
    return min(by_regs, by_threads, by_shared, sm.max_blocks)


# ------------------------------------------------------------------------------------------- cuobjdump
def cuobjdump() -> Optional[str]:
    """The cuobjdump shipped with triton (or on PATH), or None."""
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _run_cuobjdump(*args: str) -> str:
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with triton in triton/backends/nvidia/bin)")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True, timeout=300).stdout


@dataclass
class FunctionCode:
    """The compile-time facts of one GPU function."""
    name: str
    arch: int
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    loads: dict = field(default_factory=dict)  # access width in bits -> count of global loads
    stores: dict = field(default_factory=dict)

    @property
    def spills(self) -> int:
        return self.stack + self.local


_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# global loads (LDG; LDGSTS: cp.async, global to shared, what a pipelined loop's loads become) and stores;
# not LDGDEPBAR (the cp.async group barrier)
_GLOBAL = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])")


def _width(modifiers: str) -> int:
    mods = modifiers.split(".")
    for bits in ("128", "64"):
        if bits in mods:
            return int(bits)
    if {"U16", "S16"} & set(mods):
        return 16
    if {"U8", "S8"} & set(mods):
        return 8
    return 32


def read_functions(path: str, arch: Optional[int] = None) -> dict[tuple[str, int], FunctionCode]:
    """(mangled name, arch) -> FunctionCode for every function in a fat binary (.so), or in a cubin of the
    given arch (a bare cubin does not name its arch)."""
    out: dict[tuple[str, int], FunctionCode] = {}
    default_arch = arch
    name = None
    for line in _run_cuobjdump("--dump-resource-usage", path).splitlines():
        if m := re.search(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.search(r"Function (\S+):", line):
            name = m.group(1)
        elif (m := _RESOURCE.search(line)) and name is not None:
            regs, stack, shared, local = map(int, m.groups())
            out[(name, arch)] = FunctionCode(name, arch, regs, stack, local, shared)
    arch, fn = default_arch, None
    for line in _run_cuobjdump("-sass", path).splitlines():
        if m := re.search(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.search(r"Function : (\S+)", line):
            fn = out.setdefault((m.group(1), arch), FunctionCode(m.group(1), arch))
        elif fn is not None:
            for kind, mods in _GLOBAL.findall(line):
                counts = fn.loads if kind.startswith("LDG") else fn.stores
                w = _width(mods)
                counts[w] = counts.get(w, 0) + 1
    return out


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable C++ names (c++filt, when there), with the namespaces dropped."""
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    lines = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    clean = lambda s: s.replace("fastsemdiff::(anonymous namespace)::", "").replace("c10::", "")  # noqa: E731
    return {n: clean(d) for n, d in zip(names, lines.splitlines())}


# ------------------------------------------------------------------------------ Triton: the stand-in driver
@functools.lru_cache(maxsize=None)
def gpu_kernels() -> types.SimpleNamespace:
    """``fastsemdiff.kernels`` as a GPU process defines it (JIT functions, not the interpreter's).

    Triton decides interpreter-or-compiler when ``triton.language`` itself is imported (its own jit helpers
    such as ``tl.sum`` are defined then), so this must run in a process started without ``TRITON_INTERPRET``:
    :func:`run_in_subprocess` starts one."""
    import triton

    if triton.knobs.runtime.interpret:
        raise RuntimeError("the codegen helpers compile kernels, which the Triton interpreter cannot: run them in a "
                           "process without TRITON_INTERPRET=1 (bench/codegen.py's run_in_subprocess does)")
    from fastsemdiff.kernels import modulated_layer_norm as mln
    from fastsemdiff.kernels import timestep_embedding as ts

    if mln.INTERPRETED:
        raise RuntimeError("fastsemdiff.kernels was defined under the Triton interpreter in this process")
    return types.SimpleNamespace(mln=mln, ts=ts)


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its grid and the arguments the launcher passed."""
    fn: object
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def num_warps(self) -> int:
        return int(self.kwargs.get("num_warps", 4))


class _Recorder:
    def __init__(self, fn, log: list):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.fn, tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def record(arch: int):
    """Within it, the launchers record their launches (a list it yields) instead of running, with
    the device's SM count and device class (the launch table's key) those of the ``arch`` GPU (the launchers'
    only queries of the device)."""
    k = gpu_kernels()
    log: list[Launch] = []
    patches = [(k.mln, "_fwd_kernel"), (k.mln, "_bwd_kernel"), (k.mln, "_finish_kernel"),
               (k.ts, "_timestep_embedding_kernel")]
    saved = {(mod, n): getattr(mod, n) for mod, n in patches}
    saved_device = (k.mln._sm_count, k.mln._device_class)
    try:
        for mod, n in patches:
            setattr(mod, n, _Recorder(saved[(mod, n)], log))
        k.mln._sm_count = lambda device: SMS[arch].sm_count
        k.mln._device_class = lambda device: f"sm_{arch}"  # the launch table's key for this GPU
        yield log
    finally:
        for (mod, n), v in saved.items():
            setattr(mod, n, v)
        k.mln._sm_count, k.mln._device_class = saved_device


class _DeviceTensor:
    """A meta tensor as the JIT sees a CUDA tensor: its dtype and an address (allocation base + offset)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = _BASE_ADDRESS + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


def _on_device(a):
    return _DeviceTensor(a) if isinstance(a, torch.Tensor) else a


@dataclass
class Compiled:
    """A Triton launch compiled for one arch, with what the JIT derived for it."""
    launch: Launch
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    code: FunctionCode
    threads: int
    ptx: str = ""  # the PTX Triton emitted (tests read it for approximate instructions)

    @property
    def blocks_per_sm(self) -> int:
        return blocks_per_sm(self.arch, self.code.regs, self.threads, self.code.shared)

    def divisible_by_16(self) -> list[str]:
        """The parameters the JIT specialised as divisible by 16."""
        names = [p.name for p in self.launch.fn.params]
        return sorted(names[path[0]] for path, kv in self.attrs.items()
                      if any(k == "tt.divisibility" and v == 16 for k, v in kv))


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Specialise a recorded launch as ``JITFunction.run`` would on an ``arch`` GPU, and compile it to a cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug  # as JITFunction.run
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    args = [_on_device(a) for a in launch.args]
    kwargs = {k: _on_device(v) for k, v in kwargs.items()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{fn.__name__}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        functions = read_functions(str(cubin), arch)
    (code,) = [c for (name, a), c in functions.items() if a == arch]
    code.shared = max(code.shared, int(getattr(kernel.metadata, "shared", 0)))
    return Compiled(launch, arch, signature, constexprs, attrs, code, 32 * options.num_warps, kernel.asm.get("ptx", ""))


# ------------------------------------------------------------------------ the launches of the DiT block ops
@dataclass(frozen=True)
class NormCase:
    """One variant of the modulated norm as the ops layer calls it in a DiT block: x ``[B, N, C]``
    contiguous; shift/scale/gate chunks of one adaLN output ``[B, chunks * C]`` (per-sample), or of a
    ``[B, N, chunks * C]`` one (per-token)."""
    C: int
    dtype: torch.dtype
    residual: bool = False
    rms: bool = False
    affine: bool = False
    per_token: bool = False
    B: int = 256
    N: int = 256

    @property
    def label(self) -> str:
        parts = ["rms" if self.rms else "ln", "residual" if self.residual else "plain"]
        if self.affine:
            parts.append("affine")
        if self.per_token:
            parts.append("per-token")
        return "+".join(parts)


def _norm_inputs(case: NormCase):
    from fastsemdiff.ops.modulated_norm import _affine, _mod_rows, _tokens

    B, N, C, dt = case.B, case.N, case.C, case.dtype
    meta = dict(device="meta", dtype=dt)
    x = torch.empty(B, N, C, **meta)
    h = torch.empty(B, N, C, **meta)
    ada = torch.empty(B, N, 6 * C, **meta) if case.per_token else torch.empty(B, 6 * C, **meta)
    # DiT's chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp. norm1 takes the first two,
    # the gated residual + norm2 gate_msa, shift_mlp and scale_mlp.
    chunks = ada.chunk(6, dim=-1)
    mods = ({"gate": chunks[2], "shift": chunks[3], "scale": chunks[4]} if case.residual
            else {"shift": chunks[0], "scale": chunks[1]})
    rows, t = _mod_rows(mods, B, N, C, x.shape)
    weight = torch.empty(C, device="meta", dtype=torch.float32) if case.affine else None
    bias = torch.empty(C, device="meta", dtype=torch.float32) if case.affine and not case.rms else None
    weight, bias = _affine(weight, bias)
    return _tokens(x), _tokens(h), dict(zip(mods, rows)), weight, bias, t


def norm_launches(case: NormCase, arch: int, fwd_config: Optional[dict] = None,
                  bwd_config: Optional[dict] = None) -> list[Launch]:
    """The forward and backward launches of one norm variant, as the launchers make them on an ``arch`` GPU
    (with the launch table's settings, or these configs over them)."""
    k = gpu_kernels().mln
    x2d, h2d, mods, weight, bias, t = _norm_inputs(case)
    with record(arch) as log:
        if case.residual:
            x_out, y, mean, rstd = k.modulated_norm_fwd(x2d, mods["shift"], mods["scale"], weight, bias, 1e-6, t,
                                                        case.rms, h2d, mods["gate"], config=fwd_config)
            k.modulated_norm_bwd(torch.empty_like(y), x_out, mean, rstd, mods["scale"], weight, bias, t, case.rms,
                                 torch.empty_like(x_out), h2d, mods["gate"], config=bwd_config)
        else:
            _, y, mean, rstd = k.modulated_norm_fwd(x2d, mods["shift"], mods["scale"], weight, bias, 1e-6, t,
                                                    case.rms, config=fwd_config)
            k.modulated_norm_bwd(torch.empty_like(y), x2d, mean, rstd, mods["scale"], weight, bias, t, case.rms,
                                 config=bwd_config)
    return log


def config_problems(op: str, direction: str, C: int, config: dict, arch: int = 90,
                    dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """What the codegen rules find wrong with one launch config of DiT's variant of ``op`` (no affine,
    per-sample modulation) in ``direction`` at width C: the tuner keeps only configs with none, so the table it
    writes passes tests/test_codegen.py. Compiles in this process (it must not run the interpreter)."""
    case = NormCase(C, dtype, residual=op == "gated_residual_norm")
    kernel = "_fwd_kernel" if direction == "fwd" else "_bwd_kernel"
    launches = norm_launches(case, arch, **{f"{direction}_config": config})
    problems = []
    for launch in launches:
        if launch.name == kernel:
            c = compile_launch(launch, arch)
            problems += _row("triton", kernel, case.label, C, _dtype_str(dtype), arch, c.code, c.threads,
                             C % 8 == 0, tile_rows=int(launch.kwargs.get("ROWS", 1)))["problems"]
    return problems


def timestep_launch(dim: int, arch: int, B: int = 256) -> Launch:
    """The timestep-embedding launch for a batch of fp32 t (as the models pass them)."""
    with record(arch) as log:
        gpu_kernels().ts.timestep_embedding_fwd(torch.empty(B, device="meta"), dim)
    (launch,) = log
    return launch


def norm_cases() -> list[NormCase]:
    """Every variant the launchers use: at each width and dtype DiT's own (LayerNorm without affine,
    per-sample, with and without the gated residual); the other switches (RMSNorm, affine, both, per-token
    modulation), with and without the residual, at the widest DiT width in bf16 (each is a compile-time
    flag, so one width and dtype shows what it adds)."""
    cases = [NormCase(C, dt, residual=r) for C in WIDTHS for dt in DTYPES for r in (False, True)]
    for r in (False, True):
        C, dt = max(DIT_WIDTHS), torch.bfloat16
        cases += [NormCase(C, dt, residual=r, affine=True), NormCase(C, dt, residual=r, rms=True),
                  NormCase(C, dt, residual=r, rms=True, affine=True), NormCase(C, dt, residual=r, per_token=True)]
    return cases


# --------------------------------------------------------------------------------------- fastsemdiff._C
def built_extension() -> Optional[Path]:
    """The built fastsemdiff._C shared object, or None."""
    spec = importlib.util.find_spec("fastsemdiff")
    for folder in spec.submodule_search_locations or []:
        found = sorted(Path(folder).glob("_C*.so"))
        if found:
            return found[0]
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "BFloat16", torch.float16: "Half", torch.float32: "float"}[dtype]


def cuda_row_launch(C: int) -> tuple[int, int]:
    """(threads per row, launch bound of the backward) the dispatcher in csrc/adaln.cu picks for width C
    (``row_launch`` and the ``bound`` choice in ``adaln_bwd_impl``)."""
    threads = (C // 8 + 31) // 32 * 32
    bound = 256 if threads <= 256 else 512 if threads <= 512 else 1024
    return threads, bound


def cuda_selected(C: int, dtype: torch.dtype) -> list[tuple[str, int]]:
    """(readable kernel name, threads per block) of every fastsemdiff._C kernel the dispatcher can select for
    x of width C and this dtype: forward and backward, gated or not, modulation in x's dtype or fp32."""
    threads, bound = cuda_row_launch(C)
    rows_per_block = 4 if threads == 32 else 1
    x = _dtype_name(dtype)
    mods = [x] if dtype == torch.float32 else [x, "float"]
    out = []
    for m in mods:
        for gated in ("false", "true"):
            out.append((f"void adaln_fwd_kernel<{x}, {m}, {gated}>(FwdParams)", threads * rows_per_block))
            out.append((f"void adaln_bwd_kernel<{x}, {m}, {gated}, {bound}>(BwdParams)", threads * rows_per_block))
            # the rows variants (fastsemdiff.ops._cuda.FWD_VARIANTS / BWD_VARIANTS), where they take the width
            if C <= CUDA_FWD_ROWS_MAX_C:
                out.append((f"void adaln_fwd_rows_kernel<{x}, {m}, {gated}>(FwdParams)", CUDA_FWD_ROWS_THREADS))
            if threads <= CUDA_BWD_ROWS_MAX_THREADS:
                for tile in (CUDA_BWD_ROWS_TILES_GATED if gated == "true" else CUDA_BWD_ROWS_TILES):
                    out.append((f"void adaln_bwd_rows_kernel<{x}, {m}, {gated}, {tile}>(BwdParams)", threads))
    if threads <= CUDA_BWD_ROWS_MAX_THREADS:
        out.append((CUDA_FINISH_KERNEL, CUDA_FINISH_THREADS))
    return out


# The rows variants' launch facts (csrc/adaln.cu: kFwdRowsMaxC, kFwdRowsWarps, kBwdRowsMaxThreads, the tiles of
# bwd variants 1 and 2, kFinishThreads).
CUDA_FWD_ROWS_MAX_C = 1280
CUDA_FWD_ROWS_THREADS = 128
CUDA_BWD_ROWS_MAX_THREADS = 192
CUDA_BWD_ROWS_TILES = (4, 2)
CUDA_BWD_ROWS_TILES_GATED = (2,)  # 4 rows of x, dy, dx_out and h spill at the two-blocks-per-SM bound
CUDA_FINISH_KERNEL = "adaln_bwd_finish_kernel(FinishParams)"
CUDA_FINISH_THREADS = 256


TIMESTEP_CUDA_KERNEL = "timestep_embedding_kernel(float const*, float*, long, int, int, float, float)"
TIMESTEP_CUDA_THREADS = 256


@functools.lru_cache(maxsize=None)
def extension_functions() -> dict[tuple[str, int], FunctionCode]:
    """(readable name, arch) -> FunctionCode for every kernel of the built fastsemdiff._C."""
    so = built_extension()
    if so is None:
        raise RuntimeError("fastsemdiff._C is not built")
    raw = read_functions(str(so))
    names = demangle(sorted({n for n, _ in raw}))
    return {(names[n], a): c for (n, a), c in raw.items()}


# ---------------------------------------------------------------------------------------------- checks
def access_problems(code: FunctionCode, dtype: Optional[torch.dtype], scalar_accesses: int) -> list[str]:
    """Why the global accesses are not those of 16-byte rows: every access is 128-bit except up to
    ``scalar_accesses`` 32- or 64-bit ones (a tile's row statistics, vectors loaded or stored once per program,
    t), and both loads and stores use 128 bits."""
    problems = []
    for kind, counts in (("load", code.loads), ("store", code.stores)):
        narrow = {w: n for w, n in counts.items() if w not in (128, 64, 32)}
        if narrow:
            problems.append(f"{kind}s of {narrow} bits (width: count)")
    scalars = sum(c.get(w, 0) for c in (code.loads, code.stores) for w in (32, 64))
    if scalars > scalar_accesses:
        problems.append(f"{scalars} 32/64-bit accesses (at most {scalar_accesses} per-row or per-program ones "
                        f"expected)")
    if not code.loads.get(128) and scalar_accesses < sum(code.loads.values()):
        problems.append("no 128-bit load")
    if not code.stores.get(128):
        problems.append("no 128-bit store")
    return problems


def access_width(code: FunctionCode) -> str:
    """The widths of the global accesses, e.g. ``ld 128x6 32x2 / st 128x1``."""
    fmt = lambda c: " ".join(f"{w}x{n}" for w, n in sorted(c.items(), reverse=True)) or "-"  # noqa: E731
    return f"ld {fmt(code.loads)} / st {fmt(code.stores)}"


# ------------------------------------------------------------------------------------------- the table
# Stack frames accepted, with why (kernel name -> (bytes, reason)).
ACCEPTED_STACK = {
    "_timestep_embedding_kernel": (40, "libdevice sinf/cosf: the Payne-Hanek reduction for |t f| > 105615 keeps "
                                       "a 28-byte table on the stack (40 B at some widths since the frequencies "
                                       "are read from a table, not computed with tl.exp); DiT's t f <= 1000 "
                                       "never takes that path"),
    TIMESTEP_CUDA_KERNEL: (32, "sinf/cosf (accurate, to match torch bit for bit): the same Payne-Hanek slow path, "
                               "never taken for t f <= 1000"),
}
# Stack frames of one variant on one triton version, accepted with why ((kernel, variant, width, dtype, arch,
# triton "major.minor") -> (bytes, reason)): found by CI on the GPU image's triton, not on the newer one.
ACCEPTED_STACK_VARIANT = {
    **{("_fwd_kernel", "ln+residual", C, "float32", 90, "3.6"): (
        8, "triton 3.6 keeps 8 bytes on the stack in the fp32 gated forward at 4 rows x 1,024 lanes per tile on "
           "sm_90 (48 registers); triton 3.8 compiles the same source with none. fp32 activations are not the "
           "training dtype (bf16); accepted until the GPU check times it") for C in (768, 1024)},
    ("_bwd_kernel", "rms+plain", 1152, "bfloat16", 90, "3.6"): (
        8, "triton 3.6 spills 8 bytes (two registers) in the RMSNorm backward at C = 1152 bf16 on sm_90, at 64 "
           "registers x 256 threads; triton 3.8 compiles the same source with none. Not DiT's norm (LayerNorm); "
           "accepted until scripts/gpu_check.py times it on the 3.6 image"),
}
# fastsemdiff._C kernels whose stores are not 128-bit, with why.
ACCEPTED_NARROW = {
    TIMESTEP_CUDA_KERNEL: "writes one fp32 per thread, coalesced (a [B, 256] fp32 output once per step)",
    CUDA_FINISH_KERNEL: "the rows backward's finish: one output element per thread in the output's dtype "
                        "(dshift/dscale/dgate [B, C], dweight/dbias [C]), coalesced; a few MB per backward",
}
# 32-bit scalar accesses allowed beside the 128-bit rows (mean and rstd of a row); None: the kernel reads no rows
# (the timestep kernel reads t and libdevice's trig-reduction table), so only its stores are checked.
# The tiled Triton kernels: the forward stores a tile's mean and rstd and may load w and b once; the backward
# loads a tile's mean and rstd, and once per program the modulation row, gate, w, b (spread over all threads, so
# narrower than 128 bits where BLOCK_C < 8 x threads) and stores its partial rows (dshift, dscale, dgate, dw, db).
SCALAR_ACCESSES = {"_fwd_kernel": 4, "_bwd_kernel": 11, "_finish_kernel": 0, "_timestep_embedding_kernel": None,
                   "adaln_fwd_kernel": 2, "adaln_bwd_kernel": 4, "timestep_embedding_kernel": None,
                   # the CUDA rows variants: mean and rstd stored per row; loaded per row of a 4-row tile and of a
                   # per-token row
                   "adaln_fwd_rows_kernel": 2, "adaln_bwd_rows_kernel": 2 * 4 + 2,
                   "adaln_bwd_finish_kernel": None}


def allowed_scalars(kernel: str, tile_rows: int = 1) -> Optional[int]:
    """32/64-bit accesses allowed beside the 128-bit rows: SCALAR_ACCESSES, plus in the backward up to one per row
    statistic of a tile (triton 3.6 moves a pipelined tile's mean and rstd as 2 x ROWS scalar cp.asyncs)."""
    base = SCALAR_ACCESSES[kernel]
    return base + 2 * tile_rows if base is not None and kernel == "_bwd_kernel" else base


# Kernel variants whose accesses are not all 128-bit, with why ((kernel, variant suffix) -> reason).
ACCEPTED_NARROW_VARIANT = {
    ("_finish_kernel", "weight/bias sums"): "writes the [C] weight/bias gradient once per backward (4 warps over "
                                            "256 columns: 64-bit fp32 stores); its reads are 128-bit",
}
# Variants with fewer than two resident blocks per SM, with why ((kernel, variant) -> reason).
ACCEPTED_OCCUPANCY = {
    ("_bwd_kernel", "ln+residual+affine"): "triton 3.6 (the GPU image) compiles the affine + gated-residual backward "
                                           "at C = 1152 (one row per tile, 2 stages) to 158-168 registers: one block "
                                           "of 8 warps per SM (triton 3.8: 127, two blocks). Not a DiT variant (DiT's "
                                           "norms have no affine)",
}


def _short(kernel: str) -> str:
    return re.sub(r"^void ", "", kernel).split("<")[0].split("(")[0]


def _row(impl: str, kernel: str, variant: str, width: int, dtype: str, arch: int, code: FunctionCode,
         threads: int, aligned: bool, tile_rows: int = 1, **extra) -> dict:
    """One result: the facts and what fails the codegen rules (``problems``; accepted deviations in ``note``)."""
    problems, notes = [], []
    accepted_bytes, why = ACCEPTED_STACK.get(kernel, (0, ""))
    triton_version = ""
    if impl == "triton":
        import triton

        triton_version = ".".join(triton.__version__.split(".")[:2])
    accepted_bytes, why = ACCEPTED_STACK_VARIANT.get((kernel, variant, width, dtype, arch, triton_version),
                                                     (accepted_bytes, why))
    if code.spills > accepted_bytes:
        problems.append(f"stack {code.stack} B, local {code.local} B")
    elif code.spills:
        notes.append(f"stack {code.spills} B accepted: {why}")
    blocks = blocks_per_sm(arch, code.regs, threads, code.shared)
    if blocks < 2:
        if (kernel, variant) in ACCEPTED_OCCUPANCY:
            notes.append(f"{blocks} block per SM accepted: {ACCEPTED_OCCUPANCY[(kernel, variant)]}")
        else:
            problems.append(f"{code.regs} registers x {threads} threads leave {blocks} block(s) per SM")
    if aligned:
        scalars = allowed_scalars(_short(kernel), tile_rows)
        if scalars is None:  # no rows read: the stores only
            narrow = [f"stores of {w} bits" for w in code.stores if w != 128]
        else:
            narrow = access_problems(code, None, scalars)
        variant_reason = next((r for (k, v), r in ACCEPTED_NARROW_VARIANT.items()
                               if k == kernel and variant.endswith(v)), None)
        if narrow and kernel in ACCEPTED_NARROW:
            notes.append(f"accesses accepted: {ACCEPTED_NARROW[kernel]}")
        elif narrow and variant_reason:
            notes.append(f"accesses accepted: {variant_reason}")
        else:
            problems += narrow
    return dict(impl=impl, kernel=kernel, variant=variant, width=width, dtype=dtype, arch=arch, regs=code.regs,
                threads=threads, blocks_per_sm=blocks, access=access_width(code), stack=code.stack, local=code.local,
                shared=code.shared, aligned=aligned, problems=problems, note="; ".join(notes), **extra)


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _triton_task(task) -> list[dict]:
    kind, arg, arch = task
    if kind == "timestep":
        # fp32 rows: 16-byte aligned when dim % 4 == 0, but the JIT only knows divisibility by 16
        launches, variant, width, dtype = [timestep_launch(arg, arch)], "fp32 out", arg, "float32"
        aligned = arg % 16 == 0
    else:
        launches, variant, width = norm_launches(arg, arch), arg.label, arg.C
        dtype, aligned = _dtype_str(arg.dtype), arg.C % 8 == 0
    rows = []
    for launch in launches:
        c = compile_launch(launch, arch)
        v = variant
        if launch.name == "_finish_kernel":  # the second step of the backward's sums: which ones
            v = f"{variant} {'per-sample sums' if launch.grid[0] > 1 else 'weight/bias sums'}"
        rows.append(_row("triton", launch.name, v, width, dtype, arch, c.code, c.threads, aligned,
                         tile_rows=int(launch.kwargs.get("ROWS", 1)),
                         grid=list(launch.grid), num_warps=launch.num_warps, divisible_by_16=c.divisible_by_16(),
                         config={k: launch.kwargs[k] for k in ("ROWS", "TILES", "NUM_STAGES", "K", "PARTS")
                                 if k in launch.kwargs}))
    return rows


def triton_tasks() -> list:
    tasks = [("norm", case, arch) for case in norm_cases() for arch in ARCHS]
    tasks += [("timestep", dim, arch) for dim in (FREQ_DIM, *WIDTHS) for arch in ARCHS]
    return tasks


def triton_rows(workers: int = 1) -> list[dict]:
    """Every Triton kernel variant at every width, dtype and arch, compiled (``workers`` processes)."""
    tasks = triton_tasks()
    if workers <= 1:
        return [r for t in tasks for r in _triton_task(t)]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return [r for rows in pool.map(_triton_task, tasks) for r in rows]


def extension_archs() -> list[int]:
    """The archs of ARCHS the built fastsemdiff._C holds machine code for (TORCH_CUDA_ARCH_LIST at build time)."""
    present = {a for _, a in extension_functions()}
    return [a for a in ARCHS if a in present]


def extension_rows() -> list[dict]:
    """Every fastsemdiff._C kernel the dispatcher selects at the DiT widths, per dtype and arch, from the .so."""
    functions = extension_functions()
    rows = []
    for arch in extension_archs():
        for C in DIT_WIDTHS:
            for dt in DTYPES:
                for kernel, threads in cuda_selected(C, dt):
                    code = functions.get((kernel, arch))
                    if code is None:
                        raise RuntimeError(f"{kernel} for sm_{arch} is not in {built_extension()}")
                    variant = ("gated" if ", true" in kernel else "plain") + (", fp32 mod" if ", float," in kernel
                                                                             and dt != torch.float32 else "")
                    rows.append(_row("cuda", kernel, variant, C, _dtype_str(dt), arch, code, threads, True))
        code = functions[(TIMESTEP_CUDA_KERNEL, arch)]
        rows.append(_row("cuda", TIMESTEP_CUDA_KERNEL, "fp32 out", FREQ_DIM, "float32", arch, code,
                         TIMESTEP_CUDA_THREADS, True))
    return rows


def run_in_subprocess(what: str = "triton", timeout: float = 1500) -> list[dict]:
    """``python bench/codegen.py --json`` in a fresh process without the Triton interpreter, importing the
    fastsemdiff this process imports."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(importlib.util.find_spec("fastsemdiff").origin).resolve().parents[1])  # this process's copy
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--what", what, "--json", str(out)], env=env,
                       cwd=tmp, check=True, timeout=timeout)
        return json.loads(out.read_text())


def markdown(rows: list[dict]) -> str:
    """The rows as one markdown table."""
    head = ("| impl | kernel | variant | width | dtype | arch | launch | registers | threads | blocks/SM | global "
            "accesses (bits x count) | stack / local B | verdict |\n" + "|---" * 13 + "|")
    lines = [head]
    for r in rows:
        verdict = "; ".join(r["problems"]) if r["problems"] else ("ok" + (f" ({r['note']})" if r["note"] else ""))
        if not r["aligned"] and not r["problems"]:
            verdict += " (width not a multiple of 8: masked, narrower accesses expected)"
        cfg = r.get("config") or {}
        launch = ", ".join([f"grid {'x'.join(map(str, r['grid']))}" if r.get("grid") else "",
                            *(f"{k.lower()} {v}" for k, v in cfg.items())]).strip(", ") or "-"
        lines.append(f"| {r['impl']} | `{_short(r['kernel'])}` | {r['variant']} | {r['width']} | {r['dtype']} | "
                     f"sm_{r['arch']} | {launch} | {r['regs']} | {r['threads']} | {r['blocks_per_sm']} | "
                     f"{r['access']} | {r['stack']} / {r['local']} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=["triton", "cuda", "all"], default="all")
    parser.add_argument("--json", help="write the rows here (else print the markdown table)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    rows = []
    if args.what in ("triton", "all"):
        rows += triton_rows(args.workers)
    if args.what in ("cuda", "all"):
        rows += extension_rows()
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    else:
        print(markdown(rows))


if __name__ == "__main__":
    main()
