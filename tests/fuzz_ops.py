"""Fuzzing the fused norm ops against the plain-PyTorch reference: random shapes, strides, dtypes and modulation
layouts; each case either matches the reference (forward and every gradient, by the accuracy rule) or raises
one of the documented errors, and never crashes.

A case (drawn from ``random.Random(seed * 1_000_003 + index)``, so any case can be replayed alone by its index):

* op: the modulated norm or the gated residual + norm; LayerNorm or RMSNorm; no affine, weight and bias, or
  one of them;
* shape: ``B`` in {0, 1, 2, 3} (0: an empty batch), ``N`` in {1, ..., 17}, ``C`` odd, a multiple of 8, a DiT
  width, or above the CUDA row limit (on a GPU budget);
* dtype: float32, bfloat16 or float16 for x (h and the modulation sometimes in another float dtype);
* modulation layout: ``[B, C]``, ``[B, 1, C]`` or ``[B, N, C]``, each either its own tensor, a column chunk of
  one adaLN output (``[B, 6C]`` or ``[B, N, 6C]``: what DiT hands the norms), or a transposed view;
* x (and h): contiguous, a column chunk of a wider tensor (rows not 16-byte aligned when C is odd), or a
  transposed view;
* every tenth case one broken thing (a modulation of the wrong width, eps NaN, h of another shape): the case must
  then raise ValueError with the documented message.

Each case runs, per backend asked for, the user-facing ops (``fastsemdiff.ops.modulated_layer_norm`` /
``gated_residual_modulated_norm``) forward and backward, and (where the extension is built) the raw
``fastsemdiff._C`` forward on the case's ``[M, C]`` rows, which must either match or raise one of
``CPP_ERRORS`` (on CPU tensors it validates, then refuses with "CUDA tensors only").

Run alone: ``python tests/fuzz_ops.py --device cuda --backends triton,cuda --cases 400 --progress p.txt
--out fuzz.json``. Before each case its name is written to the progress file (flushed), so a crash of the
process names the case that killed it; ``--start`` resumes after it (scripts/gpucheck/stages/fuzz.py does).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

# Test hook: the index of a case at which the process kills itself with SIGSEGV (tests of the gpu_check stage's
# crash handling plant one; never set otherwise).
PLANT_CRASH_AT = os.environ.get("FASTSEMDIFF_FUZZ_PLANT_CRASH")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The documented refusals of the raw fastsemdiff._C ops (csrc/validate.h) for inputs the CUDA kernels do not
# take; any other exception from a valid input is a failure.
CPP_ERRORS = ("is not a positive multiple of 8", "exceeds the CUDA kernels' row limit", "16-byte aligned address",
              "is not a multiple of 16 bytes", "fastsemdiff._C ops run on CUDA tensors only")


@dataclass
class Case:
    index: int
    op: str  # "mln" or "grmln"
    rms: bool
    B: int
    N: int
    C: int
    dtype: str
    mod_dtype: str
    h_dtype: str
    kinds: dict  # modulation name -> "BC" | "B1C" | "BNC"
    mod_source: str  # "separate" | "adaln_chunks" | "transposed"
    x_layout: str  # "contiguous" | "column_chunk" | "transposed"
    affine: str  # "none" | "both" | "weight" | "bias"
    eps: float
    broken: Optional[str] = None  # None, or what was broken on purpose: the documented error is expected

    @property
    def name(self) -> str:
        kinds = "/".join(f"{k}:{v}" for k, v in self.kinds.items())
        return (f"case{self.index}-{self.op}-{'rms' if self.rms else 'ln'}-B{self.B}N{self.N}C{self.C}-{self.dtype}"
                f"-mod_{self.mod_dtype}-{kinds}-{self.mod_source}-x_{self.x_layout}-{self.affine}"
                f"{'-broken_' + self.broken if self.broken else ''}")


def draw_case(seed: int, index: int, big: bool = False) -> Case:
    """Case ``index`` of the seeded stream (``big``: widths and batches a GPU budget allows)."""
    r = random.Random(seed * 1_000_003 + index)
    op = r.choice(["mln", "grmln"])
    width_kind = r.choice(["odd", "odd", "mult8", "mult8", "dit"] + (["wide"] if big else []))
    if width_kind == "odd":
        C = r.randrange(1, 400 if big else 140, 2)
    elif width_kind == "mult8":
        C = 8 * r.randint(1, 256 if big else 24)
    elif width_kind == "dit":
        C = r.choice([72, 384, 1152] if big else [72, 96])
    else:
        C = r.choice([8200, 8192, 12288])
    B = r.choice([0, 1, 1, 2, 3] + ([4, 8] if big else []))
    N = r.choice([1, 1, 2, 3, 7, 17] + ([64, 256] if big and C <= 2048 else []))
    dtype = r.choice(list(DTYPES))
    mod_dtype = dtype if r.random() < 0.7 else r.choice(list(DTYPES))
    h_dtype = dtype if r.random() < 0.8 else r.choice(list(DTYPES))
    names = ["shift", "scale"] + (["gate"] if op == "grmln" else [])
    if r.random() < 0.6:  # one layout for all, as DiT hands them
        kind = r.choice(["BC", "B1C", "BNC"])
        kinds = {n: kind for n in names}
    else:
        kinds = {n: r.choice(["BC", "B1C", "BNC"]) for n in names}
    mod_source = r.choice(["separate", "adaln_chunks", "adaln_chunks", "transposed"])
    x_layout = r.choice(["contiguous", "contiguous", "column_chunk", "transposed"])
    affine = r.choice(["none", "none", "both", "weight", "bias"])
    eps = r.choice([1e-6, 1e-6, 1e-5])
    broken = None
    if index % 10 == 9:  # every tenth case breaks one thing on purpose
        broken = r.choice(["mod_width", "eps_nan"] + (["h_shape"] if op == "grmln" else []))
    return Case(index, op, r.random() < 0.5, B, N, C, dtype, mod_dtype, h_dtype, kinds, mod_source, x_layout,
                affine, eps, broken)


# ----------------------------------------------------------------------------------------------- inputs
def _randn(g: torch.Generator, *shape, scale=1.0, offset=0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset


def make_leaves(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """The case's leaf tensors in fp64 on the CPU (cast and moved by the caller); views are taken from them by
    :func:`operands`, so gradients are read on the leaves."""
    g = torch.Generator().manual_seed(seed * 7919 + case.index)
    B, N, C = case.B, case.N, case.C
    leaves = {}
    x_cols = C + (3 if case.x_layout == "column_chunk" else 0)
    leaves["x"] = _randn(g, B, N, x_cols, scale=2.0, offset=0.7) if case.x_layout != "transposed" else \
        _randn(g, B, C, N, scale=2.0, offset=0.7)
    if case.op == "grmln":
        leaves["h"] = _randn(g, *leaves["x"].shape, scale=1.5)
    names = list(case.kinds)
    if case.mod_source == "adaln_chunks":  # one [B, 6C] (or [B, N, 6C]) adaLN output per layout
        for kind in sorted(set(case.kinds.values())):
            shape = {"BC": (B, 6 * C), "B1C": (B, 1, 6 * C), "BNC": (B, N, 6 * C)}[kind]
            leaves[f"ada_{kind}"] = _randn(g, *shape, scale=0.5, offset=0.1)
    else:
        for n in names:
            kind = case.kinds[n]
            shape = {"BC": (B, C), "B1C": (B, 1, C), "BNC": (B, N, C)}[kind]
            if case.mod_source == "transposed":
                shape = shape[:-2] + (shape[-1], shape[-2]) if len(shape) == 3 else (C, B)
            leaves[n] = _randn(g, *shape, scale=0.5, offset=0.2 if n == "gate" else 0.0)
    if case.affine in ("both", "weight"):
        leaves["weight"] = _randn(g, C, scale=0.3, offset=1.0)
    if case.affine in ("both", "bias"):
        leaves["bias"] = _randn(g, C, scale=0.3)
    return leaves


def operands(case: Case, leaves: dict[str, torch.Tensor]) -> dict[str, Optional[torch.Tensor]]:
    """The op's arguments as views of the leaves (chunks, transposes) in the case's layout."""
    C = case.C
    x = leaves["x"]
    x = x[..., :C] if case.x_layout == "column_chunk" else (x.transpose(1, 2) if case.x_layout == "transposed" else x)
    out = {"x": x}
    if case.op == "grmln":
        h = leaves["h"]
        out["h"] = h[..., :C] if case.x_layout == "column_chunk" else (
            h.transpose(1, 2) if case.x_layout == "transposed" else h)
    for i, n in enumerate(case.kinds):
        if case.mod_source == "adaln_chunks":
            out[n] = leaves[f"ada_{case.kinds[n]}"][..., i * C:(i + 1) * C]
        elif case.mod_source == "transposed":
            out[n] = leaves[n].transpose(-1, -2)
        else:
            out[n] = leaves[n]
    out["weight"], out["bias"] = leaves.get("weight"), leaves.get("bias")
    if case.broken == "mod_width":
        out["shift"] = out["shift"][..., : max(C - 1, 0)] if C > 1 else torch.cat([out["shift"]] * 2, -1)
    if case.broken == "h_shape":
        out["h"] = out["h"][:, :0] if case.N > 1 or case.B == 0 else torch.cat([out["h"]] * 2, 1)
    return out


def _cast_leaves(case: Case, leaves: dict, device: torch.device, low: bool) -> dict:
    """Leaves in the case's dtypes (``low``) or those same values in fp64 (the exact reference's inputs), on
    ``device``, as fresh autograd leaves."""
    out = {}
    for k, v in leaves.items():
        if k in ("x",):
            dtype = DTYPES[case.dtype]
        elif k == "h":
            dtype = DTYPES[case.h_dtype]
        elif k in ("weight", "bias"):
            dtype = torch.float32
        else:
            dtype = DTYPES[case.mod_dtype]
        v = v.to(dtype)
        out[k] = (v if low else v.double()).to(device).requires_grad_()
    return out


# ------------------------------------------------------------------------------------------------- runs
def _fused(case: Case, backend: str) -> Callable:
    from fastsemdiff.ops import gated_residual_modulated_norm, modulated_layer_norm

    eps = math.nan if case.broken == "eps_nan" else case.eps

    def run(o):
        if case.op == "mln":
            return (modulated_layer_norm(o["x"], o["shift"], o["scale"], o["weight"], o["bias"], eps, case.rms,
                                         backend=backend, check="off"),)
        return gated_residual_modulated_norm(o["x"], o["h"], o["gate"], o["shift"], o["scale"], o["weight"],
                                             o["bias"], eps, case.rms, backend=backend, check="off")
    return run


def _reference(case: Case) -> Callable:
    from fastsemdiff.nn.norm import gated_residual_modulated_norm_ref, modulated_layer_norm_ref

    def run(o):  # the fp64 run normalises x_out as the op stores it: in the case's dtype
        if case.op == "mln":
            return (modulated_layer_norm_ref(o["x"], o["shift"], o["scale"], o["weight"], o["bias"], case.eps,
                                             case.rms),)
        x = o["x"]
        return gated_residual_modulated_norm_ref(x, o["h"].to(x.dtype), o["gate"], o["shift"], o["scale"],
                                                 o["weight"], o["bias"], case.eps, case.rms, DTYPES[case.dtype])
    return run


def _outputs_and_grads(fn: Callable, case: Case, leaves: dict, dys: list) -> tuple[list, dict]:
    outs = fn(operands(case, leaves))
    keys = list(leaves)
    grads = torch.autograd.grad([o for o in outs], [leaves[k] for k in keys],
                                [d.to(o.dtype) for d, o in zip(dys, outs)], allow_unused=True)
    return [o.detach() for o in outs], dict(zip(keys, grads))


def check_against_reference(case: Case, seed: int, backend: str, device: torch.device) -> list[str]:
    """The fused op on ``backend`` against the reference: forward outputs and the gradient of every leaf. Returns
    the mismatches (empty: it passed)."""
    from fastsemdiff.ops.guard import compare

    leaves64 = make_leaves(case, seed)
    g = torch.Generator().manual_seed(seed * 31 + case.index)
    shape = (case.B, case.N, case.C)
    # in the outputs' dtype (x's), so the exact reference gets the very values the others get
    dys = [_randn(g, *shape).to(DTYPES[case.dtype]).to(device) for _ in range(1 if case.op == "mln" else 2)]
    low = _cast_leaves(case, leaves64, device, low=True)
    got, got_grads = _outputs_and_grads(_fused(case, backend), case, low, dys)
    same, same_grads = _outputs_and_grads(_reference(case), case, _cast_leaves(case, leaves64, device, low=True), dys)
    exact, exact_grads = _outputs_and_grads(_reference(case), case, _cast_leaves(case, leaves64, device, low=False),
                                            dys)
    problems = []
    for i, (a, e, s) in enumerate(zip(got, exact, same)):
        name = ["y"] if case.op == "mln" else ["x_out", "y"]
        if a.dtype != s.dtype or a.shape != s.shape:
            problems.append(f"{name[i]}: {a.dtype} {tuple(a.shape)}, expected {s.dtype} {tuple(s.shape)}")
        elif (m := compare(name[i], a, e, s)) is not None:
            problems.append(str(m))
    for k in leaves64:
        a, e, s = got_grads[k], exact_grads[k], same_grads[k]
        if e is None:
            continue
        if a is None or a.dtype != low[k].dtype or a.shape != low[k].shape:
            problems.append(f"d{k}: {None if a is None else (a.dtype, tuple(a.shape))}, expected "
                            f"{low[k].dtype} {tuple(low[k].shape)}")
        elif (m := compare(f"d{k}", a, e, s)) is not None:
            problems.append(str(m))
    return problems


def _raw_rows(case: Case, o: dict):
    """The case's operands as the raw ops' [M, C] rows and tokens_per_mod_row, or None where the layouts differ."""
    if len(set(case.kinds.values())) > 1:
        return None
    B, N, C = case.B, case.N, case.C
    kind = next(iter(case.kinds.values()))
    tpm = 1 if kind == "BNC" else N
    rows = {k: (v.reshape(math.prod(v.shape[:-1]), v.shape[-1]) if v is not None and v.dim() > 1 else v)
            for k, v in o.items()}
    if case.op == "grmln":
        rows["h"] = rows["h"].to(rows["x"].dtype)
    return rows, tpm


def check_raw_cuda_op(case: Case, seed: int, device: torch.device) -> list[str]:
    """The raw fastsemdiff._C forward on the case's rows: matches the reference, or raises a documented error."""
    from fastsemdiff.nn.norm import gated_residual_modulated_norm_ref, modulated_layer_norm_ref
    from fastsemdiff.ops import _cuda
    from fastsemdiff.ops.guard import compare

    ops = _cuda.load()
    if ops is None:
        return []
    leaves = _cast_leaves(case, make_leaves(case, seed), device, low=True)
    o = {k: (None if v is None else v.detach()) for k, v in operands(case, leaves).items()}
    raw = _raw_rows(case, o)
    if raw is None:
        return []
    rows, tpm = raw
    eps = math.nan if case.broken == "eps_nan" else case.eps
    try:
        if case.op == "mln":
            y = ops.mln_fwd(rows["x"], rows["shift"], rows["scale"], rows["weight"], rows["bias"], eps, tpm,
                            case.rms)[0]
        else:
            y = ops.grmln_fwd(rows["x"], rows["h"], rows["gate"], rows["shift"], rows["scale"], rows["weight"],
                              rows["bias"], eps, tpm, case.rms)[1]
    except RuntimeError as e:
        text = str(e)
        if case.broken or any(p in text for p in CPP_ERRORS):
            return []
        return [f"raw _C op raised an undocumented error: {text.splitlines()[0][:300]}"]
    if case.broken:
        return [f"raw _C op took a broken input ({case.broken})"]

    def ref(dtype):
        oo = {k: (None if v is None else v.to(dtype) if dtype == torch.float64 else v) for k, v in o.items()}
        if case.op == "mln":
            return modulated_layer_norm_ref(oo["x"], oo["shift"], oo["scale"], oo["weight"], oo["bias"], case.eps,
                                            case.rms)
        return gated_residual_modulated_norm_ref(oo["x"], oo["h"].to(oo["x"].dtype), oo["gate"], oo["shift"],
                                                 oo["scale"], oo["weight"], oo["bias"], case.eps, case.rms,
                                                 DTYPES[case.dtype])[1]
    m = compare("raw y", y.reshape(case.B, case.N, case.C), ref(torch.float64), ref(None))
    return [] if m is None else [str(m)]


EXPECTED_VALUE_ERRORS = {"mod_width": "must be", "eps_nan": "eps must be finite", "h_shape": "h must be"}


def run_case(case: Case, seed: int, backends: list[str], device: torch.device, raw: bool = True) -> dict:
    """One case on every backend (and, with ``raw``, the raw fastsemdiff._C forward):
    ``{"name", "case", "status": pass|fail|refused, "problems", "seconds"}``."""
    start = time.time()
    problems: list[str] = []
    status = "pass"
    for backend in backends:
        try:
            found = check_against_reference(case, seed, backend, device)
            if case.broken:
                found = [f"{backend}: a broken input ({case.broken}) was taken"]
            problems += [f"{backend}: {p}" for p in found]
        except ValueError as e:
            if case.broken and EXPECTED_VALUE_ERRORS[case.broken] in str(e):
                status = "refused"
            else:
                problems.append(f"{backend}: unexpected ValueError: {str(e)[:300]}")
        except Exception as e:  # noqa: BLE001 - any other exception is a finding, reported by name
            problems.append(f"{backend}: {type(e).__name__}: {str(e)[:300]} | "
                            f"{traceback.format_exc(limit=3).splitlines()[-2].strip()[:200]}")
    if raw:
        try:
            problems += check_raw_cuda_op(case, seed, device)
        except Exception as e:  # noqa: BLE001
            problems.append(f"raw _C: {type(e).__name__}: {str(e)[:300]}")
    if problems:
        status = "fail"
    return {"name": case.name, "case": asdict(case), "status": status, "problems": problems,
            "seconds": round(time.time() - start, 3)}


def run(cases: int, seed: int, backends: list[str], device: str = "cpu", start: int = 0, big: bool = False,
        progress: Optional[str] = None, on_result: Optional[Callable[[dict], None]] = None,
        raw: bool = True, max_seconds: Optional[float] = None) -> list[dict]:
    """Cases ``start .. cases-1`` of the seeded stream (fewer when ``max_seconds`` runs out); the progress file
    (if any) names each case before it runs."""
    dev = torch.device(device)
    results = []
    t0 = time.time()
    for i in range(start, cases):
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
        case = draw_case(seed, i, big)
        if progress:
            with open(progress, "a") as f:
                f.write(f"{i}\t{case.name}\n")
                f.flush()
                os.fsync(f.fileno())
        if PLANT_CRASH_AT is not None and i == int(PLANT_CRASH_AT):
            import signal
            os.kill(os.getpid(), signal.SIGSEGV)
        result = run_case(case, seed, backends, dev, raw)
        results.append(result)
        if on_result:
            on_result(result)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default="triton")
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--big", action="store_true", help="GPU-sized widths and batches")
    p.add_argument("--progress", default=None, help="file naming each case before it runs (for crash reports)")
    p.add_argument("--out", default=None, help="JSON lines of the results (appended)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop starting cases after this long")
    p.add_argument("--no-raw", action="store_true", help="skip the raw fastsemdiff._C forward")
    a = p.parse_args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")

    def write(result):
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(result) + "\n")
        if result["status"] == "fail":
            print(f"FAIL {result['name']}: {'; '.join(result['problems'])}", flush=True)

    results = run(a.cases, a.seed, a.backends.split(","), a.device, a.start, a.big, a.progress, write,
                  raw=not a.no_raw, max_seconds=a.max_seconds)
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "refused", "fail")}
    print(f"fuzz: {len(results)} cases from {a.start} (seed {a.seed}, {a.device}, {a.backends}): {counts}", flush=True)
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
