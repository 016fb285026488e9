"""Turn a pytest-benchmark JSON file into markdown tables and a roofline plot.

    python bench/report.py bench.json [-o table.md] [--plot roofline.png] [--command "pytest bench/ ..."]

One table per benchmark group. Each row: the implementation, time per call, images/s (training steps),
achieved TFLOP/s and GB/s with their % of the ceilings measured in the same run (MFU for training steps on
a GPU whose peak is known), and how many times faster it is than each baseline present in the same group
(``torch_eager``/``sdpa_math``: the reference; ``torch_compile``; ``diffusers``). Where a case recorded the
device time of its call (``kernel_us_per_call``: a CUDA-graph replay, the kernels without the host around
them; "n/a on CPU" on a CPU), the row shows it beside the call time, each with its GB/s and % of the copy
ceiling, and the table's header writes out the bytes formula. The copy ceiling is the run's own
``copy_ceiling`` case (its device time where recorded) when the JSON has one, else the ceiling each record
carries (the percentages are then recomputed against it, a ratio of two figures of the run). Everything comes
from the JSON: nothing is added that the run did not measure. The roofline plots achieved TFLOP/s against
arithmetic intensity (FLOPs per byte) for the cases whose FLOPs and minimum bytes are both known, under the
copy and matmul ceilings of the run.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

BASELINES = ("torch_eager", "sdpa_math", "torch_compile", "diffusers")


def _rows(bench: dict) -> list[dict]:
    """A benchmark record as table rows (an interleaved record holds one row per implementation)."""
    info = bench.get("extra_info", {})
    if "interleaved" in info:
        return [{"impl": impl, "s": v["ms"] / 1e3, "images_per_s": v.get("images_per_s"),
                 "tflop_per_s": v.get("tflop_per_s"), "ceiling_tflops": info.get("ceiling_tflops"),
                 "name": bench["name"]} for impl, v in info["interleaved"].items()]
    s = info["us_per_call"] / 1e6 if "us_per_call" in info else bench["stats"]["median"]
    row = {"impl": info.get("impl", bench["name"]), "s": s, "name": bench["name"]}
    for key in ("images_per_s", "tflop_per_s", "ceiling_tflops", "pct_of_matmul", "gb_per_s", "ceiling_gbs",
                "pct_of_copy", "mfu_pct", "flops", "bytes", "host_syncs", "images_per_s", "bytes_formula",
                "kernel_method", "kernel_gb_per_s", "kernel_pct_of_copy"):
        if key in info:
            row[key] = info[key]
    if "kernel_us_per_call" in info:
        row["kernel_s"] = info["kernel_us_per_call"] / 1e6
    return [row]


def copy_ceiling(data: dict) -> tuple[float, str] | None:
    """The run's copy ceiling from its ``copy_ceiling`` case (GB/s, and what it is), or None without one."""
    best = None
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("op") != "copy":
            continue
        gbs, how = ((info["kernel_gb_per_s"], "device time") if info.get("kernel_gb_per_s")
                    else (info.get("gb_per_s"), "call time"))
        if gbs and (best is None or gbs > best[0]):
            best = (gbs, f"{gbs:.1f} GB/s, the {how} of this run's device-to-device copy of "
                         f"{info.get('bytes', 0) / 2 / 2**20:.0f} MiB (read + write)")
    return best


def _bandwidth(gbs, row_pct, ceiling) -> str:
    if not gbs:
        return ""
    pct = 100 * gbs / ceiling[0] if ceiling else row_pct
    return f"{gbs:.1f} ({pct:.0f}%)" if pct is not None else f"{gbs:.1f}"


def _time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def tables(data: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["name"]].extend(_rows(bench))
    out = []
    ceiling = copy_ceiling(data)
    for group, rows in groups.items():
        present = [b for b in BASELINES if any(r["impl"] == b for r in rows)]
        if len(rows) == 1:
            present = []
        base_s = {b: min(r["s"] for r in rows if r["impl"] == b) for b in present}
        cols = ["impl", "time/call"]
        if any(r.get("images_per_s") for r in rows):
            cols.append("img/s")
        if any(r.get("tflop_per_s") for r in rows):
            cols.append("TFLOP/s (% of ceiling)")
        kernel = any("kernel_method" in r for r in rows)
        if any(r.get("gb_per_s") for r in rows):
            cols.append("GB/s (% of copy)")
        if kernel:
            cols += ["kernel time", "kernel GB/s (% of copy)"]
        if any("host_syncs" in r for r in rows):
            cols.append("host syncs/step")
        cols += [f"x vs {b}" for b in present]
        out += [f"### {group}", ""]
        formulas = sorted({(r["bytes_formula"], r.get("bytes")) for r in rows if r.get("bytes_formula")})
        for formula, nbytes in formulas:
            out.append(f"bytes moved: {formula}" + (f" = {nbytes / 1e6:.1f} MB" if nbytes else "")
                       + (f"; copy ceiling: {ceiling[1]}" if ceiling else ""))
        if kernel:
            out.append("time/call: per call as a training step calls it (Python, autograd, launches); kernel time: "
                       "the device time of the same call (" + "; ".join(sorted({
                           r["kernel_method"] if r.get("kernel_s") else r["kernel_method"] for r in rows
                           if "kernel_method" in r})) + ")")
        if formulas or kernel:
            out.append("")
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = [r["impl"], _time(r["s"])]
            if "img/s" in cols:
                cells.append(f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "")
            if "TFLOP/s (% of ceiling)" in cols:
                cell = ""
                if r.get("tflop_per_s"):
                    cell = f"{r['tflop_per_s']:.3f}"
                    if r.get("mfu_pct") is not None:
                        cell += f" (MFU {r['mfu_pct']:.1f}%)"
                    elif r.get("ceiling_tflops"):
                        cell += f" ({100 * r['tflop_per_s'] / r['ceiling_tflops']:.0f}% of matmul)"
                cells.append(cell)
            if "GB/s (% of copy)" in cols:
                cells.append(_bandwidth(r.get("gb_per_s"), r.get("pct_of_copy"), ceiling))
            if kernel:
                if r.get("kernel_s"):
                    cells += [_time(r["kernel_s"]),
                              _bandwidth(r.get("kernel_gb_per_s"), r.get("kernel_pct_of_copy"), ceiling)]
                else:
                    cells += [r.get("kernel_method", "").split(" (")[0] if r.get("kernel_method") else "", ""]
            if "host syncs/step" in cols:
                cells.append(str(r.get("host_syncs", "")))
            cells += [f"{base_s[b] / r['s']:.2f}" for b in present]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def header(data: dict, command: str) -> str:
    mi = data.get("machine_info", {})
    fs = mi.get("fastsemdiff", {})
    ci = data.get("commit_info", {})
    lines = [f"- date: {data.get('datetime', 'unknown')}",
             f"- device: {fs.get('device', 'unknown')} (host: {mi.get('cpu', {}).get('brand_raw', 'unknown')}, "
             f"{mi.get('cpu', {}).get('count', '?')} CPUs)",
             f"- versions: torch {fs.get('torch', '?')}, CUDA {fs.get('cuda', '?')}, triton {fs.get('triton', '?')}, "
             f"diffusers {fs.get('diffusers', '?')}, python {mi.get('python_version', '?')}",
             f"- commit: {fs.get('commit') or ci.get('id', 'unknown')}" + (" (with uncommitted changes)"
                                                                          if ci.get("dirty") else ""),
             f"- ceilings measured in the run: {fs.get('ceilings', {})}",
             f"- command: `{command}`"]
    return "\n".join(lines)


def roofline(data: dict, path: Path) -> int:
    """Write the roofline PNG; returns how many points it holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("flops") and info.get("bytes") and info.get("tflop_per_s"):
            points.append((info["flops"] / info["bytes"], info["tflop_per_s"],
                           f"{bench.get('group') or bench['name']} {info.get('impl', '')}".strip()))
    ceilings = data.get("machine_info", {}).get("fastsemdiff", {}).get("ceilings", {})
    fig, ax = plt.subplots(figsize=(9, 6))
    xs = [p[0] for p in points] or [1.0]
    lo, hi = min(xs) / 4, max(xs) * 4
    gbs, tflops = ceilings.get("copy_gbs"), ceilings.get("matmul_tflops")
    if gbs and tflops:
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(tflops, gbs * x / 1e3) for x in grid], "k-", lw=1.5,
                label=f"ceilings: copy {gbs:.0f} GB/s, matmul {tflops:.3g} TFLOP/s")
    for i, (x, y, label) in enumerate(points):
        ax.scatter([x], [y], s=25, color=f"C{i % 10}", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte, minimum bytes)")
    ax.set_ylabel("achieved TFLOP/s")
    device = data.get("machine_info", {}).get("fastsemdiff", {}).get("device", "")
    ax.set_title(f"roofline, {device}, {data.get('datetime', '')[:10]}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(points)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="the file of pytest --benchmark-json")
    p.add_argument("-o", "--output", type=Path, help="write the markdown here (default: stdout)")
    p.add_argument("--plot", type=Path, help="write the roofline PNG here")
    p.add_argument("--command", default=None, help="the command that produced the JSON, for the header")
    args = p.parse_args(argv)
    data = json.loads(args.json.read_text())
    if not data.get("benchmarks"):
        print(f"report: {args.json} holds no benchmarks", file=sys.stderr)
        return 1
    command = args.command or f"pytest bench/ --benchmark-only --benchmark-json {args.json.name}"
    text = header(data, command) + "\n\n" + tables(data)
    if args.output:
        args.output.write_text(text)
    else:
        print(text)
    if args.plot:
        n = roofline(data, args.plot)
        print(f"report: roofline with {n} points -> {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
