"""The speed switches measured on and off in one process: images/s, MFU, the ratio to the compiled reference of
the same size (the main job's rows: to the main job's defaults), the mean loss over the last quarter of the steps
run (every row starts from the same weights and draws the same noise per step, so a switch that changes the
numerics shows here), and host syncs per step on a GPU.

    python bench/switch_matrix.py --json m.json --md m.md [--deadline-s 120] [--sizes XL2,main,B2,S2]
    python bench/switch_matrix.py --dry-run --json m.json    # CPU: tiny shapes; the GPU-only switches are refused

Rows run in the order of ``gpu_rows`` (the reference and the main job first, then each switch, the slow compiles
last); a row that would start after the deadline is recorded "not reached" instead, and the JSON is rewritten after
every row, so a time box that stops the process keeps what was measured. A switch the device cannot run is a
skipped row with the reason (the same check the trainer makes at start).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainstep import (CPU_SIZES, DRY_RUN_BANNER, GPU_SIZES, build_step, count_host_syncs,  # noqa: E402
                       main_job_step, time_steps)

from fastsemdiff.config import ConfigError  # noqa: E402
from fastsemdiff.flops import peak_tflops  # noqa: E402

# (size, impl, label, switches); size "main" is the main job's step (impl: its config's own)
LEVERS_XL = [
    ("attention=flash", ["model.attention=flash"]),
    ("attention=cudnn", ["model.attention=cudnn"]),
    ("mlp_epilogue=addmm", ["model.mlp_epilogue=addmm"]),
    ("update=foreach", ["train.update=foreach"]),  # the default on CUDA is fused: this is the lever off
    ("fp8=rowwise", ["train.fp8=rowwise"]),
    ("fp8=tensorwise", ["train.fp8=tensorwise"]),
    ("attention=efficient", ["model.attention=efficient"]),
    ("attention=flash_attn", ["model.attention=flash_attn"]),
    ("update=loop", ["train.update=loop"]),
    ("reduce-overhead", ["train.compile_mode=reduce-overhead"]),
    ("max-autotune-no-cudagraphs", ["train.compile_mode=max-autotune-no-cudagraphs"]),
]
# The main job is launch-bound on a GPU (a 1.8M-parameter step of a few hundred small launches): CUDA graphs first
MAIN_LEVERS = [
    ("reduce-overhead", ["train.compile_mode=reduce-overhead"]),
    ("model scope + reduce-overhead", ["train.compile_scope=model", "train.compile_mode=reduce-overhead"]),
    ("model scope", ["train.compile_scope=model"]),
    ("update=foreach", ["train.update=foreach"]),
]


def gpu_rows(sizes: list[str]) -> list[tuple[str, str, str, list[str]]]:
    rows = []
    if "XL2" in sizes:
        rows += [("XL2", "torch_compile", "reference (torch.compile)", []), ("XL2", "fused", "fused (defaults)", [])]
    if "main" in sizes:
        rows += [("main", "main", "main job (defaults)", [])] + [("main", "main", lb, sw) for lb, sw in MAIN_LEVERS[:3]]
    if "XL2" in sizes:
        rows += [("XL2", "fused", label, sw) for label, sw in LEVERS_XL]
    if "main" in sizes:
        rows += [("main", "main", label, sw) for label, sw in MAIN_LEVERS[3:]]
    for size in ("B2", "S2"):
        if size in sizes:
            rows += [(size, "torch_compile", "reference (torch.compile)", []), (size, "fused", "fused (defaults)", []),
                     (size, "fused", "attention=flash", ["model.attention=flash"]),
                     (size, "fused", "mlp_epilogue=addmm", ["model.mlp_epilogue=addmm"])]
    return rows


def dry_rows() -> list[tuple[str, str, str, list[str]]]:
    """The CPU's rows: the plain step and each switch the CPU runs, and the refusals of those it cannot."""
    levers = [("attention=math", ["model.attention=math"]), ("attention=flash", ["model.attention=flash"]),
              ("mlp_epilogue=addmm", ["model.mlp_epilogue=addmm"]), ("update=fused", ["train.update=fused"]),
              ("update=loop", ["train.update=loop"]), ("attention=cudnn", ["model.attention=cudnn"]),
              ("fp8=rowwise", ["train.fp8=rowwise"]),
              ("reduce-overhead", ["train.compile=on", "train.compile_mode=reduce-overhead"])]
    return ([("tiny", "torch_eager", "reference (eager)", [])] + [("tiny", "torch_eager", lb, sw) for lb, sw in levers]
            + [("main", "main", "main job (defaults)", []), ("main", "main", "mlp_epilogue=addmm",
                                                             ["model.mlp_epilogue=addmm"])])


def measure(size_id: str, impl: str, switches: list[str], device: torch.device, warmup: int, steps: int,
            main_batch: int | None) -> dict:
    if size_id == "main":
        step = main_job_step(device, switches, batch=main_batch)
    else:
        step = build_step("dit", {**GPU_SIZES, **CPU_SIZES}[size_id], impl, device, switches)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out = {"batch": step.batch, **time_steps(step, warmup, steps, peak)}
    if device.type == "cuda":
        out["host_syncs"] = count_host_syncs(step)
    return out


def add_ratios(rows: list[dict]) -> None:
    """ratio: images/s over the first measured row of the same size (the compiled reference; the main job's
    defaults); loss_rel: the relative difference of the last-quarter loss to that row's."""
    base: dict[str, dict] = {}
    for r in rows:
        if "images_per_s" not in r:
            continue
        b = base.setdefault(r["size"], r)
        r["ratio_to_reference"] = round(r["images_per_s"] / b["images_per_s"], 3)
        r["reference"] = b["variant"]
        r["loss_rel_to_reference"] = round(abs(r["loss_last_quarter"] - b["loss_last_quarter"])
                                           / max(abs(b["loss_last_quarter"]), 1e-12), 5)


def table(rows: list[dict]) -> str:
    lines = ["| size | variant | img/s | MFU | x reference | loss (last quarter) | loss vs reference | host syncs/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "images_per_s" not in r:
            lines.append(f"| {r['size']} | {r['variant']} | {r.get('skipped') or r.get('not_reached') or r.get('error')} "
                         "| | | | | |")
            continue
        mfu = f"{r['mfu_pct']}%" if "mfu_pct" in r else "n/a"
        lines.append(f"| {r['size']} b{r['batch']} | {r['variant']} | {r['images_per_s']:.0f} | {mfu} | "
                     f"{r['ratio_to_reference']:.2f} (of {r['reference']}) | {r['loss_last_quarter']:.4f} | "
                     f"{100 * r['loss_rel_to_reference']:.2f}% | {r.get('host_syncs', 'n/a')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 1 warm-up and 2 timed steps per row")
    ap.add_argument("--sizes", default="XL2,main", help="GPU: some of XL2, main, B2, S2 (default XL2,main)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--main-batch", type=int, default=None, help="the main job's batch (default: its config's)")
    ap.add_argument("--deadline-s", type=float, default=None, help="start no row after this many seconds")
    ap.add_argument("--min-row-s", type=float, default=20, help="a row needs at least this much time left")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        ap.error("no CUDA device: the matrix's sizes are GPU sizes; use --dry-run on a CPU")
    plan = dry_rows() if args.dry_run else gpu_rows([s.strip() for s in args.sizes.split(",")])
    warmup, steps = (1, 2) if args.dry_run else (args.warmup, args.steps)
    main_batch = args.main_batch or (16 if args.dry_run else None)
    rows: list[dict] = []
    for size_id, impl, label, switches in plan:
        row = {"size": size_id, "impl": impl, "variant": label, "switches": switches}
        left = (args.deadline_s - (time.monotonic() - t0)) if args.deadline_s else float("inf")
        if left < args.min_row_s:
            row["not_reached"] = f"not reached: {args.deadline_s:.0f} s time box"
        else:
            try:
                row.update(measure(size_id, impl, switches, device, warmup, steps, main_batch))
            except (ConfigError, ImportError) as e:
                row["skipped"] = f"skipped: {e}"
            except torch.OutOfMemoryError as e:
                row["skipped"] = f"skipped: out of memory ({str(e).splitlines()[0][:120]})"
            except Exception as e:  # a switch that breaks is a row's failure, not the matrix's
                row["error"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        add_ratios(rows)
        shown = (f"{row['images_per_s']:.0f} img/s" if "images_per_s" in row
                 else row.get("skipped") or row.get("not_reached") or row.get("error"))
        print(f"[switch-matrix] {size_id} {label}: {shown}", flush=True)
        Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                               "wall_s": round(time.monotonic() - t0, 1), "rows": rows}, indent=1))
    md = table(rows)
    if args.dry_run:
        md = DRY_RUN_BANNER + md
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    errors = [r for r in rows if "error" in r or r.get("finite") is False]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
