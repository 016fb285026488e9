"""Ablations of the method's open switches at equal compute, written up as a markdown table.

    python scripts/ablate.py [--config configs/fmnist-tiny.yaml] [--steps N] [--only NAME ...]
                             [--limit-train N] [--out docs/ABLATIONS.md] [-- KEY=VALUE ...]

Every variant trains from one config (default: the main job's) for the same steps and batch (one budget
of images seen), with one switch set to the value the config does not use, then goes through the same
probe (``python -m fastsemdiff.eval probe --no-baselines``: the linear probe at each t of eval.ts, the
best t and the multi-t concatenation; on all 60,000 / 10,000 images unless ``--limit-train``). A variant
that resolves to the base config itself is skipped. Runs land in runs/ablate/NAME; a finished run is
probed again rather than retrained, so the script can be stopped and restarted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastsemdiff.config import load_config  # noqa: E402

# name -> (overrides, what it tests). "base" is the config as it is.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "base": ([], "the config as it is"),
    "consistency-on": (["diffusion.lambda_cons=0.1"], "sequential consistency, weight 0.1"),
    "consistency-off": (["diffusion.lambda_cons=0"], "no sequential-consistency term"),
    "noisy-input": (["encoder.input=noisy"], "encoder reads x_t instead of x0"),
    "no-normalize": (["encoder.normalize=false"], "z not L2-normalised"),
    "concat-merge": (["model.cond_merge=concat"], "Linear([t_emb, Linear(z)]) instead of the sum"),
    "schedule-ve": (["diffusion.schedule=ve"], "VE schedule (DRL) instead of vp-cosine"),
    "schedule-flow": (["diffusion.schedule=flow", "diffusion.prediction=velocity"], "rectified flow"),
    "no-z-dropout": (["model.z_dropout=0"], "z never dropped (default 0.1)"),
    "static-encoder": (["encoder.time_conditioned=false"], "static code E(x0), the diffae-style baseline"),
    "normalize": (["encoder.normalize=true"], "z L2-normalised (the directional vector)"),
    "vit-encoder": (["encoder.arch=vit", "encoder.depth=1"], "the 1-block ViT encoder instead of the CNN"),
    "cnn-encoder": (["encoder.arch=cnn"], "the FiLM CNN encoder instead of the ViT"),
    "mean-pool": (["encoder.pool_grid=1"], "CNN map mean-pooled to one vector instead of the config's grid"),
    "grid-2": (["encoder.pool_grid=2"], "CNN map pooled to 2x2 before the head"),
    "grid-4": (["encoder.pool_grid=4"], "CNN map pooled to 4x4 before the head"),
    "no-view-flip": (["encoder.view_flip=false"], "the encoder sees x0 unflipped"),
    "view-flip": (["encoder.view_flip=true"], "the encoder's view of x0 flipped left-right at random"),
    "view-shift-2": (["encoder.view_shift=2"], "the encoder's view of x0 moved by up to 2 px"),
    "eps-target": (["diffusion.prediction=eps"], "eps-prediction instead of x0"),
    "x0-target": (["diffusion.prediction=x0"], "x0-prediction instead of eps"),
    # issue 22's levers for the embedding: where the encoder's gradient comes from, what it may carry
    "min-snr": (["diffusion.loss_weight=min_snr"], "min-SNR-5 loss weights: the low-noise terms capped"),
    "t-shift-3": (["diffusion.t_shift=3"], "training t shifted toward noise (SD3 shift 3)"),
    "t-logit-normal": (["diffusion.t_sampling=logit_normal"], "training t logit-normal (0, 1): mid t drawn most"),
    "t-logit-normal-high": (["diffusion.t_sampling=logit_normal", "diffusion.t_mean=1"],
                            "training t logit-normal (1, 1): high noise drawn most"),
    "soda-views": (["encoder.view_crop_scale=[0.35,1.0]", "encoder.view_flip=true", "encoder.view_erase=0.25"],
                   "SODA-style views for E: resized crop of 35-100 % of the area, flip, erasing p = 0.25"),
    "view-crop": (["encoder.view_crop_scale=[0.35,1.0]"], "E sees a random resized crop (35-100 % of the area)"),
    "l1-z": (["encoder.regularizer=l1", "encoder.reg_weight=1e-5"], "L1 on z, weight 1e-5 (DRL)"),
    "kl-z": (["encoder.regularizer=kl", "encoder.reg_weight=1e-5"], "a KL bottleneck on z, weight 1e-5"),
    "no-kl": (["encoder.regularizer=none"], "no bottleneck on z (the recipe until 2026-12-06)"),
    "z-64": (["encoder.dim=64"], "a 64-d z (half the width): a tighter code the denoiser must share across t"),
    "z-96": (["encoder.dim=96"], "a 96-d z"),
    "res-0011": (["encoder.conv_residual_blocks=[0,0,1,1]"],
                 "a residual FiLM conv after each of the CNN's last two stages (0.8x the step rate on 2 cores)"),
    "film-from-2": (["encoder.conv_film_from=2"],
                    "t modulates only the CNN's last two stages: the first two are a trunk every t shares"),
    "film-from-3": (["encoder.conv_film_from=3"], "t modulates only the CNN's last stage (the 7x7 map)"),
    "t-bins-3": (["encoder.t_bins=[0,0.5,1]"],
                 "E's t snapped to 0, 0.5 or 1: three codes, each trained over the third of t it serves"),
    "mask-25": (["model.token_mask=0.25"],
                "a quarter of the denoiser's input tokens hidden, scored on x0: z needed at low t too"),
    "mask-50": (["model.token_mask=0.5"], "half of the denoiser's input tokens hidden, scored on x0"),
    "inv-crop": (["encoder.view_crop_scale=[0.35,1.0]", "encoder.view_flip=true", "encoder.invariance_weight=0.5"],
                 "E sees a crop (35-100 %) and flip; its predictor pulled toward a second view's z (weight 0.5)"),
    "inv-crop-w2": (["encoder.view_crop_scale=[0.35,1.0]", "encoder.view_flip=true", "encoder.invariance_weight=2"],
                    "the same, weight 2"),
    "inv-soda": (["encoder.view_crop_scale=[0.35,1.0]", "encoder.view_flip=true", "encoder.view_erase=0.25",
                  "encoder.invariance_weight=0.5"], "the SODA views and the cross-view term (weight 0.5)"),
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)


def resolved(config: str, overrides: list[str]) -> dict:
    """The variant's full config, without the fields that only say where and how often to write."""
    d = load_config(str(REPO / config), overrides).to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("run_dir", "progress", "probe_every")}
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/fmnist-tiny.yaml")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--limit-train", type=int, default=None, help="probe on the first N train images")
    parser.add_argument("--out", default="docs/ABLATIONS.md")
    parser.add_argument("extra", nargs="*", help="KEY=VALUE overrides applied to every variant")
    args = parser.parse_args()

    py = sys.executable
    common = [*args.extra] + ([f"train.steps={args.steps}"] if args.steps else [])
    steps = load_config(str(REPO / args.config), common).train.steps
    base = resolved(args.config, common)
    rows = []
    for name in args.only:
        overrides, what = VARIANTS[name]
        if name != "base" and resolved(args.config, common + overrides) == base:
            print(f"{name}: skipped, the base config already has {' '.join(overrides)}", flush=True)
            continue
        suffix = "".join(f"-{o.replace('=', '')}" for o in args.extra).replace("/", "_").replace(".", "_")
        run_dir = REPO / "runs" / "ablate" / f"{name}{suffix}"  # a second seed (-- train.seed=1) gets its own runs
        train_cmd = [py, "-m", "fastsemdiff.train", "--config", args.config, f"train.run_dir={run_dir}",
                     "train.progress=false", "train.probe_every=0", *common, *overrides]
        probe_cmd = [py, "-m", "fastsemdiff.eval", "probe", "--run", str(run_dir), "--no-baselines"]
        if args.limit_train:
            probe_cmd += ["--limit-train", str(args.limit_train)]
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{name}.log"
        start = time.perf_counter()
        trained = 0.0
        if not (run_dir / "model.safetensors").is_file():
            run(train_cmd, log)
            trained = time.perf_counter() - start
        run(probe_cmd, log)
        r = json.loads((run_dir / "probe.json").read_text())
        rows.append((name, what, " ".join(overrides) or "-", r["multi_t"]["linear"], r["best_t"]["linear"],
                     r["best_t"]["t"], r["raw_pixels"]["linear"], trained))
        print(f"{name}: multi-t {rows[-1][3]:.2f}, best t {rows[-1][4]:.2f} (t={rows[-1][5]:g}), "
              f"pixels {rows[-1][6]:.2f}, training {trained:.0f} s", flush=True)

    lines = ["| variant | what changes | overrides | multi-t linear % | best-t linear % (t) | raw pixels % "
             "| training s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {w} | `{o}` | {m:.2f} | {b:.2f} ({t:g}) | {p:.2f} | {s:.0f} |"
              for n, w, o, m, b, t, p, s in rows]
    table = "\n".join(lines)
    print(table)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Ablations of the open switches at equal compute\n\nEach variant: the main job's config "
                       "with one switch changed, the same steps and batch, the same probe (`scripts/ablate.py`).\n")
    probe = f"train split {args.limit_train or 'all'} / test all"
    command = (f"python scripts/ablate.py --config {args.config} --steps {steps} --only {' '.join(args.only)}"
               + (f" --limit-train {args.limit_train}" if args.limit_train else "")
               + (" -- " + " ".join(args.extra) if args.extra else ""))
    with open(out, "a") as f:
        f.write(f"\n\n### {time.strftime('%Y-%m-%d')}: `{args.config}`, {steps} steps each, probe on {probe}\n\n"
                f"Command: `{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
