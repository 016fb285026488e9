"""Ablations of the method's open switches at equal compute, written up as a markdown table.

    python scripts/ablate.py [--steps 500] [--only NAME ...] [--out docs/ABLATIONS.md] [-- KEY=VALUE ...]

Every variant trains from the main job's config (configs/fmnist-tiny.yaml) for the same steps and batch
(equal compute: one budget of images seen), with one switch changed, then goes through the same probe
(``python -m fastsemdiff.eval probe --no-baselines``: the linear probe on all 60,000 / 10,000 images at
each t of eval.ts, the best t and the multi-t concatenation). Runs land in runs/ablate/NAME; a finished
run is probed again rather than retrained, so the script can be stopped and restarted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/fmnist-tiny.yaml"

# name -> (overrides, what it tests). "base" is the main job's config as it is.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "base": ([], "the main job's config"),
    "no-consistency": (["diffusion.lambda_cons=0"], "consistency weight 0 (default 0.1)"),
    "noisy-input": (["encoder.input=noisy"], "encoder reads x_t instead of x0"),
    "no-normalize": (["encoder.normalize=false"], "z not L2-normalised"),
    "concat-merge": (["model.cond_merge=concat"], "Linear([t_emb, Linear(z)]) instead of the sum"),
    "schedule-ve": (["diffusion.schedule=ve"], "VE schedule (DRL) instead of vp-cosine"),
    "schedule-flow": (["diffusion.schedule=flow", "diffusion.prediction=velocity"], "rectified flow"),
    "no-z-dropout": (["model.z_dropout=0"], "z never dropped (default 0.1)"),
    "static-encoder": (["encoder.time_conditioned=false"], "static code E(x0), the diffae-style baseline"),
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default="docs/ABLATIONS.md")
    parser.add_argument("extra", nargs="*", help="KEY=VALUE overrides applied to every variant")
    args = parser.parse_args()

    py = sys.executable
    rows = []
    for name in args.only:
        overrides, what = VARIANTS[name]
        run_dir = REPO / "runs" / "ablate" / name
        train_cmd = [py, "-m", "fastsemdiff.train", "--config", CONFIG, f"train.run_dir={run_dir}",
                     f"train.steps={args.steps}", "train.progress=false", "train.probe_every=0",
                     *overrides, *args.extra]
        probe_cmd = [py, "-m", "fastsemdiff.eval", "probe", "--run", str(run_dir), "--no-baselines"]
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{name}.log"
        start = time.perf_counter()
        if not (run_dir / "model.safetensors").is_file():
            run(train_cmd, log)
        run(probe_cmd, log)
        r = json.loads((run_dir / "probe.json").read_text())
        rows.append((name, what, " ".join(overrides) or "-", r["multi_t"]["linear"], r["best_t"]["linear"],
                     r["best_t"]["t"], r["raw_pixels"]["linear"], time.perf_counter() - start))
        print(f"{name}: multi-t {rows[-1][3]:.2f}, best t {rows[-1][4]:.2f} (t={rows[-1][5]:g})", flush=True)

    lines = [f"| variant | what changes | overrides | multi-t linear % | best-t linear % (t) | raw pixels % |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {w} | `{o}` | {m:.2f} | {b:.2f} ({t:g}) | {p:.2f} |" for n, w, o, m, b, t, p, _ in rows]
    table = "\n".join(lines)
    print(table)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Ablations of the open switches at equal compute\n\nEach variant: the main job's config "
                       "with one switch changed, the same steps and batch, the same probe (`scripts/ablate.py`).\n")
    with open(out, "a") as f:
        f.write(f"\n\n## {time.strftime('%Y-%m-%d')}: {args.steps} steps each, extra overrides "
                f"`{' '.join(args.extra) or '-'}`\n\nCommand: `python scripts/ablate.py --steps {args.steps} "
                f"--only {' '.join(args.only)}{' -- ' + ' '.join(args.extra) if args.extra else ''}`\n\n{table}\n")


if __name__ == "__main__":
    main()
