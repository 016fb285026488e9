"""Where a training step's time goes: one step under torch.profiler, its kernel time split into matmuls,
attention, norms, other elementwise/reduction kernels, and the optimizer + EMA, plus the gaps in which no kernel
runs, beside the step's throughput (images/s, MFU by ``fastsemdiff.flops``).

    python bench/profile_step.py --size XL2 --impl fused [--variant LABEL:key=value,key=value ...] --json p.json
    python bench/profile_step.py --size main                   # the main job's step (configs/fmnist-tiny.yaml)
    python bench/profile_step.py --dry-run                     # CPU, tiny shapes: the same table from CPU ops

On a GPU the split is over the CUDA kernel events: each kernel is put in a category by its own name and the names
of the ops that launched it (an op under the step's ``step.update`` phase is optimizer + EMA; then attention,
norm, matmul by name; the rest is "other"), and the gaps are the step's span on the GPU minus the union of its
kernels' intervals. On a CPU (dry run) there are no kernels: the split is over the CPU ops' self time and "gaps"
is the step's wall time outside any op (Python and framework overhead); the table says which it is.
Throughput is timed separately (warm-up, then ``--steps`` steps between two syncs), never under the profiler.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainstep import CPU_SIZES, DRY_RUN_BANNER, GPU_SIZES, build_step, main_job_step, time_steps  # noqa: E402

from fastsemdiff.config import ConfigError  # noqa: E402
from fastsemdiff.flops import peak_tflops  # noqa: E402

CATEGORIES = ("matmul/conv", "attention", "norm", "other", "optimizer+ema")
# Tried in order on the kernel's name and its launching ops' names (lower case); the first match wins.
RULES = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn.*mha|softmax")),
    ("norm", re.compile(r"norm|modulat|adaln")),
    ("matmul/conv", re.compile(r"gemm|gemv|matmul|\bmm\b|addmm|bmm|linear|cutlass|xmma|nvjet|cublas|_scaled_mm|"
                               r"sm90_|sm100_|conv|fprop|dgrad|wgrad")),
)


def categorize(names: list[str]) -> str:
    """The category of a kernel (or CPU op) given its name and its ancestors' names (innermost first)."""
    if any(n == "step.update" for n in names):
        return "optimizer+ema"
    low = [n.lower() for n in names]
    for cat, rule in RULES:
        if any(rule.search(n) for n in low):
            return cat
    return "other"


def _chain(evt) -> list[str]:
    names = []
    while evt is not None:
        names.append(evt.name)
        evt = evt.cpu_parent
    return names


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def split_events(events, on_gpu: bool) -> dict:
    """The profiled step's time by category (us) from ``prof.events()``: kernels on a GPU, CPU ops' self time on
    a CPU; ``gaps_us`` is the time with nothing running, ``span_us`` the step's span on that device."""
    cats = {c: 0.0 for c in CATEGORIES}
    step = [e for e in events if e.name == "step.profiled" and e.device_type == DeviceType.CPU]
    if on_gpu:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        for evt in events:
            if evt.device_type == DeviceType.CPU and evt.kernels:
                chain = _chain(evt)
                for k in evt.kernels:  # one op may launch several kinds (a CUDA graph replay: all of them)
                    cats[categorize([k.name] + chain)] += k.duration
        intervals = [(k.time_range.start, k.time_range.end) for k in kernels]
        busy = _union_us(intervals)
        span = (max(b for _, b in intervals) - min(a for a, _ in intervals)) if intervals else 0.0
        attributed = sum(cats.values())
        kernel_total = sum(b - a for a, b in intervals)
        unattributed = max(0.0, kernel_total - attributed)  # kernels the profiler linked to no op
        cats["other"] += unattributed
        return {"source": "CUDA kernel events", "by_category_us": cats, "kernel_us": kernel_total, "busy_us": busy,
                "span_us": span, "gaps_us": max(0.0, span - busy), "unattributed_us": unattributed,
                "kernels": len(kernels)}
    ops = [e for e in events if e.device_type == DeviceType.CPU and "::" in e.name]
    for evt in ops:
        cats[categorize(_chain(evt))] += evt.self_cpu_time_total
    span = step[0].cpu_time_total if step else sum(cats.values())
    busy = sum(cats.values())
    return {"source": "CPU op events (self time; no GPU)", "by_category_us": cats, "kernel_us": busy, "busy_us": busy,
            "span_us": span, "gaps_us": max(0.0, span - busy), "unattributed_us": 0.0, "kernels": len(ops)}


def profile_one(step) -> dict:
    """One step of ``step`` (already warm) under torch.profiler, split by ``split_events``."""
    on_gpu = step.device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    step.annotate = True
    if on_gpu:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        with torch.profiler.record_function("step.profiled"):
            step()
        if on_gpu:
            torch.cuda.synchronize()
    step.annotate = False
    return split_events(prof.events(), on_gpu)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``LABEL:key=value,key=value`` (or ``LABEL`` alone: no switches) -> (label, overrides)."""
    label, _, rest = text.partition(":")
    return label, [kv for kv in rest.split(",") if kv]


def run_case(size_id: str, impl: str, label: str, switches: list[str], device: torch.device, warmup: int,
             steps: int, batch: int | None = None) -> dict:
    """Build, time and profile one (size, impl, variant); a switch this device cannot run is a skipped row."""
    row = {"size": size_id, "impl": impl, "variant": label, "switches": switches}
    try:
        if size_id == "main":
            step = main_job_step(device, switches, batch=batch)
            row["impl"] = "main-job config"
        else:
            size = {**GPU_SIZES, **CPU_SIZES}[size_id]
            step = build_step("dit", size, impl, device, switches)
    except (ConfigError, ImportError, ValueError) as e:
        return {**row, "skipped": str(e)}
    except torch.OutOfMemoryError as e:
        return {**row, "skipped": f"out of memory: {str(e).splitlines()[0]}"}
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    row.update(batch=step.batch, **time_steps(step, warmup, steps, peak))
    row["profile"] = profile_one(step)
    return row


def table(rows: list[dict]) -> str:
    """A markdown table: one row per case, the category shares of the step's span, then the throughput."""
    head = ("| size | variant | img/s | MFU | ms/step | " + " | ".join(CATEGORIES) + " | gaps | source |\n"
            "|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|")
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['size']} | {r['variant']} | skipped: {r['skipped']} |" + " |" * (len(CATEGORIES) + 4))
            continue
        p = r["profile"]
        span = p["span_us"] or 1.0

        def cell(us: float) -> str:
            return f"{us / 1e3:.2f} ms ({100 * us / span:.0f}%)"

        mfu = f"{r['mfu_pct']}%" if "mfu_pct" in r else "n/a"
        lines.append(f"| {r['size']} b{r['batch']} | {r['variant']} | {r['images_per_s']:.0f} | {mfu} | {r['ms']:.2f} | "
                     + " | ".join(cell(p["by_category_us"][c]) for c in CATEGORIES)
                     + f" | {cell(p['gaps_us'])} | {p['source']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", action="append", help="XL2 | B2 | S2 | tiny | main (repeatable; default XL2 and main, "
                                                    "or tiny and main in a dry run)")
    ap.add_argument("--impl", default=None, help="torch_eager | torch_compile | fused (the DiT sizes; default fused, "
                                                 "torch_eager in a dry run: compiled CPU code has no ops to split)")
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL:key=value,... speed switches to profile (repeatable); the default variant always runs")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="the main job's batch (default: its config's)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 1 warm-up and 2 timed steps")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--md", help="write the table here")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    sizes = args.size or (["tiny", "main"] if device.type == "cpu" else ["XL2", "main"])
    if device.type == "cpu" and any(s in GPU_SIZES for s in sizes):
        ap.error(f"sizes {[s for s in sizes if s in GPU_SIZES]} are GPU sizes; on a CPU use --size tiny / main")
    warmup, steps = (1, 2) if args.dry_run else (args.warmup, args.steps)
    impl = args.impl or ("torch_eager" if device.type == "cpu" else "fused")
    variants = [("default", [])] + [parse_variant(v) for v in args.variant]
    rows = []
    for size_id in sizes:
        for label, switches in variants:
            row = run_case(size_id, impl, label, switches, device, warmup, steps, args.batch)
            rows.append(row)
            shown = row.get("skipped") or f"{row['images_per_s']:.0f} img/s"
            print(f"[profile] {size_id} {label}: {shown}", flush=True)
    md = table(rows)
    if args.dry_run:
        md = DRY_RUN_BANNER + md
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows},
                                              indent=1))
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0 if all(r.get("finite", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
