"""Tune the Triton adaLN kernels' launch settings on this device and write them as the launch table.

    python bench/tune_adaln.py --out runs/adaln_configs.json [--time-box 240] [--widths 384,768,1152]
    python bench/tune_adaln.py --dry-run --out runs/tune-dry/adaln_configs.json     # CPU, interpreter

For each op (modulated norm, gated residual + norm), direction and width, candidate configurations (rows per tile,
warps, stages; then programs per SM for the backward) are timed at ``[batch x tokens, C]`` bf16 as CUDA-graph
replays (``torch.cuda.CUDAGraph``: launch overhead out, the kernels' device time in), each first compiled for the
codegen rules (``bench/codegen.py``'s ``config_problems``: no spills, two blocks per SM, 128-bit rows; so the
written table passes tests/test_codegen.py) and checked against the default configuration's outputs. The fastest per
(op, direction, width) goes into a JSON in the format of ``kernels/adaln_configs.json`` under this device's class
(``sm_90``), with every timing beside it (``timings``): the lead commits the table a GPU run wrote. Time box: the
whole run stops trying candidates when it is spent (each group gets an equal share; the default is always timed
first).

``--dry-run`` proves the plumbing only: tiny shapes under the Triton interpreter (``TRITON_INTERPRET=1``, set
by this script), two candidates per group, timed with ``time.perf_counter``; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the table JSON to write")
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes, two candidates")
    p.add_argument("--time-box", type=float, default=240.0, help="seconds for all candidates together")
    p.add_argument("--widths", default=None, help="comma-separated C (default 384,768,1152; dry run 64)")
    p.add_argument("--batch", type=int, default=None, help="samples (default 256; dry run 2)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sample (default 256; dry run 16)")
    p.add_argument("--ops", default="modulated_norm,gated_residual_norm")
    p.add_argument("--directions", default="fwd,bwd")
    return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.language is imported

import torch  # noqa: E402


def candidates(op: str, direction: str, C: int, dry_run: bool) -> list[dict]:
    """Settings to try, the default first: tiles of 1-16 rows with 8-32 lanes per thread and loaded tensor
    (fewer starve the loads, more spill), 4-16 warps; the backward also with a 2-stage pipelined row loop.
    The backward's programs per SM are tuned afterwards at the best of these (:func:`split_candidates`)."""
    from fastsemdiff.kernels.adaln_config import default_config

    base = default_config(op, direction, C)
    if dry_run:
        other = dict(base, rows=max(1, base["rows"] // 2))
        return [base, other if other != base else dict(base, rows=base["rows"] * 2)]
    block = 1 << (C - 1).bit_length()
    out = [base]
    stages = (1, 2) if direction == "bwd" else (1,)
    for rows, warps, st in itertools.product((1, 2, 4, 8, 16), (4, 8, 16), stages):
        per_thread = rows * block // (32 * warps)
        if not 8 <= per_thread <= 32 or rows * block > 16384:
            continue
        cfg = dict(base, rows=rows, warps=warps, stages=st)
        if cfg not in out:
            out.append(cfg)
    return out


def split_candidates(best: dict, dry_run: bool) -> list[dict]:
    values = (best["programs_per_sm"], 16) if dry_run else (1, 2, 4, 8, 16)
    return [dict(best, programs_per_sm=v) for v in values if v != best["programs_per_sm"]]


def make_inputs(op: str, B: int, N: int, C: int, device: torch.device) -> dict:
    """bf16 activations and per-sample modulation as a DiT block passes them (2-D rows, [B, C] modulation)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, torch.bfloat16)  # noqa: E731
    M = B * N
    d = {"x": rnd(M, C, scale=2.0), "shift": rnd(B, C, scale=0.5), "scale": rnd(B, C, scale=0.5),
         "dy": rnd(M, C), "t": N}
    if op == "gated_residual_norm":
        d.update(h=rnd(M, C), gate=rnd(B, C, scale=0.5), dx_out=rnd(M, C))
    return d


def make_call(K, op: str, direction: str, d: dict, config: dict):
    """A closure running one launch of the op and direction with ``config``; returns its outputs."""
    residual = op == "gated_residual_norm"
    h, gate = (d["h"], d["gate"]) if residual else (None, None)
    x_out, _, mean, rstd = K.modulated_norm_fwd(d["x"], d["shift"], d["scale"], None, None, 1e-6, d["t"], False,
                                                h, gate)
    x_in = x_out if residual else d["x"]
    if direction == "fwd":
        return lambda: K.modulated_norm_fwd(d["x"], d["shift"], d["scale"], None, None, 1e-6, d["t"], False, h, gate,
                                            config=config)
    return lambda: K.modulated_norm_bwd(d["dy"], x_in, mean, rstd, d["scale"], None, None, d["t"], False,
                                        d.get("dx_out"), h, gate, config=config)


def agrees(got, want) -> bool:
    """Same outputs as the default config's (bf16: sums in another order differ in the last bits)."""
    for a, b in zip(got, want):
        if (a is None) != (b is None):
            return False
        if a is not None and not torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2):
            return False
    return True


def codegen_problems(op: str, direction: str, C: int, config: dict, device: torch.device, dry_run: bool) -> list:
    """The codegen rules (bench/codegen.py) for this config on this GPU's arch; none in a dry run (the
    interpreter compiles nothing: tests/test_codegen.py checks the defaults there)."""
    if dry_run or device.type != "cuda":
        return []
    sys.path.insert(0, str(ROOT / "bench"))  # bench/codegen.py (not part of the package)
    import codegen

    major, minor = torch.cuda.get_device_capability(device)
    arch = 10 * major + minor
    if arch not in codegen.SMS or codegen.cuobjdump() is None:  # no rules for this arch, or nothing to read with
        return []
    return codegen.config_problems(op, direction, C, config, arch)


def time_call(fn, device: torch.device, dry_run: bool) -> float:
    """Seconds per call: CUDA-graph replays on a GPU (10 calls per graph, replayed until ~50 ms), perf_counter
    around two calls on the CPU."""
    if dry_run or device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(2):
            fn()
        return (time.perf_counter() - t0) / 2
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph, calls = torch.cuda.CUDAGraph(), 10
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end) / 1e3
    reps = max(3, min(200, int(0.05 / max(once, 1e-6))))
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * calls)


def bytes_moved(op: str, direction: str, M: int, C: int, element: int = 2) -> int:
    """The row tensors the op must read and write (see the kernel module's docstring)."""
    tensors = {("modulated_norm", "fwd"): 2, ("modulated_norm", "bwd"): 3,
               ("gated_residual_norm", "fwd"): 4, ("gated_residual_norm", "bwd"): 6}[(op, direction)]
    return tensors * M * C * element


def tune(args: argparse.Namespace) -> dict:
    from fastsemdiff.kernels import adaln_config
    from fastsemdiff.kernels import modulated_layer_norm as K

    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not dry:
        raise SystemExit("tune_adaln: no CUDA device; run on the GPU, or with --dry-run")
    widths = [int(w) for w in (args.widths or ("64" if dry else "384,768,1152")).split(",")]
    B = args.batch or (2 if dry else 256)
    N = args.tokens or (16 if dry else 256)
    ops, directions = args.ops.split(","), args.directions.split(",")
    groups = [(op, d, C) for op in ops for d in directions for C in widths]
    deadline = time.monotonic() + args.time_box
    share = args.time_box / len(groups)
    cls = adaln_config.device_class(device)
    table: dict = {}
    timings: list = []
    for i, (op, direction, C) in enumerate(groups):
        group_end = min(deadline, time.monotonic() + share * (1 if i < len(groups) - 1 else 2))
        d = make_inputs(op, B, N, C, device)
        default = adaln_config.default_config(op, direction, C)
        try:
            want = make_call(K, op, direction, d, default)()
        except Exception as e:  # the reference outputs come from the default config: without it, no group
            timings.append({"op": op, "direction": direction, "C": C, "config": default,
                            "error": f"default config: {type(e).__name__}: {str(e)[:200]}"})
            continue
        results = []

        def measure(cfg: dict) -> None:
            entry = {"op": op, "direction": direction, "C": C, "config": cfg}
            try:
                problems = codegen_problems(op, direction, C, cfg, device, dry)
                if problems:  # spills, one block per SM, narrow rows: tests/test_codegen.py would refuse it
                    entry["error"] = "codegen: " + "; ".join(problems)
                    timings.append(entry)
                    return
                fn = make_call(K, op, direction, d, cfg)
                if not agrees(fn(), want):
                    entry["error"] = "outputs differ from the default configuration's"
                else:
                    entry["us"] = round(time_call(fn, device, dry) * 1e6, 2)
                    entry["gb_s"] = round(bytes_moved(op, direction, B * N, C) / (entry["us"] * 1e-6) / 1e9, 1)
            except Exception as e:  # a config the compiler rejects (resources) is skipped, with why
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            timings.append(entry)
            if "us" in entry:
                results.append((entry["us"], cfg))

        for cfg in candidates(op, direction, C, dry):
            if results and time.monotonic() > group_end:
                break
            measure(cfg)
        if direction == "bwd" and results:
            best = min(results, key=lambda r: r[0])[1]
            for cfg in split_candidates(best, dry):
                if time.monotonic() > group_end:
                    break
                measure(cfg)
        if results:
            us, best = min(results, key=lambda r: r[0])
            default_us = next((u for u, c in results if c == default), None)
            table.setdefault(op, {}).setdefault(direction, {})[str(C)] = {
                k: best[k] for k in adaln_config.KEYS} | {"us": us, "default_us": default_us}
            print(f"{op:20s} {direction} C={C:5d}: best {us:9.2f} us {best} (default {default_us} us; "
                  f"{len(results)} timed)", flush=True)
    return {"devices": {cls: table}, "timings": timings,
            "measured": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
                         "device_class": cls, "torch": torch.__version__, "triton": _triton_version(),
                         "commit": _commit(), "shape": [B, N], "dtype": "bfloat16", "dry_run": dry,
                         "command": "python bench/tune_adaln.py " + " ".join(sys.argv[1:])}}


def _triton_version() -> str:
    import triton

    return triton.__version__


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(args: argparse.Namespace) -> None:
    result = tune(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = ("Launch settings of the adaLN norm kernels per device class, op, direction and width, written by "
           "bench/tune_adaln.py from CUDA-graph timings (us: the best config's time per call, default_us: the "
           "default config's); read by kernels/adaln_config.py (only 'devices').")
    out.write_text(json.dumps({"_doc": doc, **result}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(ARGS)
