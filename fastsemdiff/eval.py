"""Evaluate a trained run: linear probe and kNN accuracy of its embeddings across diffusion times.

    python -m fastsemdiff.eval probe --run RUN_DIR [--ts 0 0.1 0.3] [--device cpu] [--batch-size N]
                                     [--out DIR] [--limit-train N] [--limit-test N]

Writes probe.json and probe.png into the run directory (or --out) and prints a table. The raw-pixel
baseline goes through the same probe code, so the gap to it is what the encoder learned.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from .data import DatasetError, load_split
from .errors import CheckpointError
from .probe import knn_accuracy, linear_probe, plot_accuracy_vs_t

MODEL_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------ shared CLI helpers
def load_run(run: str, device: Optional[str] = None):
    """The trained model of a run, or a SystemExit that says what to do instead of a traceback."""
    path = Path(run)
    if not path.exists():
        raise SystemExit(f"error: {run} does not exist; point --run at a run directory holding {MODEL_FILE}")
    if path.is_dir() and not (path / MODEL_FILE).is_file():
        raise SystemExit(
            f"error: {run} has no {MODEL_FILE}; train a model first (python -m fastsemdiff.train writes "
            f"RUN_DIR/{MODEL_FILE}) or point --run at a run directory that has one"
        )
    import fastsemdiff

    try:
        return fastsemdiff.load(str(path), device=device)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: could not load the model from {run}: {e}") from None


def load_data(cfg, split: str, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the run's dataset (first ``limit`` items), with data problems as a one-line exit."""
    d = cfg.data
    try:
        images, labels = load_split(d.source, d.path, split, d.image_size, d.channels)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def check_ts(ts: Sequence[float]) -> list[float]:
    ts = [float(t) for t in ts]
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise SystemExit(f"error: --ts {ts} must be one or more times in [0, 1] (0 = clean, 1 = pure noise)")
    return ts


def default_out(run: str) -> Path:
    """The run directory, also when --run names the model.safetensors file itself."""
    path = Path(run)
    return path if path.is_dir() else path.parent


# ---------------------------------------------------------------------------------------------- probe
class _Timer:
    """Accumulates seconds per named part, so the report says where the time went."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start


def _probe(timer: _Timer, train_x, train_y, test_x, test_y, knn_k: int, classes: int,
           part: str = "") -> tuple[float, float]:
    with timer(f"{part}linear"):
        linear = linear_probe(train_x, train_y, test_x, test_y, num_classes=classes)["top1"]
    with timer(f"{part}knn"):
        knn = knn_accuracy(train_x, train_y, test_x, test_y, k=knn_k)
    return linear, knn


def run_probe(model, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
              test_labels: torch.Tensor, ts: Sequence[float], batch_size: int, knn_k: int,
              progress: bool = True) -> dict:
    """Linear-probe and kNN top-1 (%) at every t, for all t concatenated, and for raw pixels."""
    start = time.perf_counter()
    timer = _Timer()
    ts = [float(t) for t in ts]
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    per_t, train_z, test_z = [], [], []
    for t in tqdm(ts, desc="probe over t", unit="t", disable=not progress):
        with timer("embed"), torch.inference_mode():
            train_z.append(model.embed(train_images, t, batch_size))
            test_z.append(model.embed(test_images, t, batch_size))
        linear, knn = _probe(timer, train_z[-1], train_labels, test_z[-1], test_labels, knn_k, classes)
        per_t.append({"t": t, "linear": linear, "knn": knn})

    if len(ts) > 1:
        linear, knn = _probe(timer, torch.cat(train_z, 1), train_labels, torch.cat(test_z, 1), test_labels,
                             knn_k, classes, "multi-t ")
    else:  # one t: the concatenation is that t's embedding, already probed
        linear, knn = per_t[0]["linear"], per_t[0]["knn"]
    multi_t = {"ts": ts, "linear": linear, "knn": knn, "dim": sum(z.shape[1] for z in train_z)}

    del train_z[:], test_z[:]  # free the embeddings before the (larger) pixel features
    train_px = train_images.to(model.device).flatten(1).float() / 255.0
    test_px = test_images.to(model.device).flatten(1).float() / 255.0
    linear, knn = _probe(timer, train_px, train_labels, test_px, test_labels, knn_k, classes, "pixels ")

    return {
        "per_t": per_t,
        "best_t": dict(max(per_t, key=lambda r: r["linear"])),
        "multi_t": multi_t,
        "raw_pixels": {"linear": linear, "knn": knn},
        "embedding_dim": multi_t["dim"] // len(ts),
        "n_train": int(train_images.shape[0]),
        "n_test": int(test_images.shape[0]),
        "knn_k": knn_k,
        "seconds": time.perf_counter() - start,
        "timings": {k: round(v, 3) for k, v in timer.parts.items()},
    }


def format_table(result: dict) -> str:
    """The probe result as aligned text: one row per t, then the summaries."""
    lines = [f"{'t':>10} | {'linear %':>9} | {'kNN %':>7}", f"{'-' * 10}-+-{'-' * 9}-+-{'-' * 7}"]
    row = "{:>10} | {:9.2f} | {:7.2f}"
    for r in result["per_t"]:
        lines.append(row.format(f"{r['t']:g}", r["linear"], r["knn"]))
    lines.append(f"{'-' * 10}-+-{'-' * 9}-+-{'-' * 7}")
    m, b, p = result["multi_t"], result["best_t"], result["raw_pixels"]
    lines.append(row.format("multi-t", m["linear"], m["knn"]) + f"   ({len(m['ts'])} ts, dim {m['dim']})")
    lines.append(row.format("best t", b["linear"], b["knn"]) + f"   (t = {b['t']:g})")
    lines.append(row.format("pixels", p["linear"], p["knn"]))
    return "\n".join(lines)


def probe_command(args: argparse.Namespace) -> dict:
    model = load_run(args.run, args.device)
    cfg = model.cfg
    ts = check_ts(args.ts if args.ts is not None else cfg.eval.ts)
    train_images, train_labels = load_data(cfg, "train", args.limit_train)
    test_images, test_labels = load_data(cfg, "test", args.limit_test)
    out = Path(args.out) if args.out else default_out(args.run)
    out.mkdir(parents=True, exist_ok=True)
    print(f"probing {args.run}: {len(train_labels)} train / {len(test_labels)} test images, t in {ts}, "
          f"device {model.device}")

    result = run_probe(model, train_images, train_labels, test_images, test_labels, ts,
                       args.batch_size or cfg.eval.batch_size, cfg.eval.knn_k)
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_accuracy_vs_t(result["per_t"], out / "probe.png", {
        "raw pixels, linear": result["raw_pixels"]["linear"],
        "raw pixels, kNN": result["raw_pixels"]["knn"],
    })
    print(format_table(result))
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items())
    print(f"total {result['seconds']:.1f} s ({parts}); wrote {out / 'probe.json'} and {out / 'probe.png'}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastsemdiff.eval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="linear probe and kNN accuracy of the embeddings across t")
    p.add_argument("--run", required=True, help=f"run directory holding {MODEL_FILE} (or the file itself)")
    p.add_argument("--ts", type=float, nargs="+", default=None, help="diffusion times (default: eval.ts)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best available)")
    p.add_argument("--batch-size", type=int, default=None, help="embedding batch size (default: eval.batch_size)")
    p.add_argument("--out", default=None, help="folder for probe.json and probe.png (default: the run directory)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N train images (tests)")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images (tests)")
    p.set_defaults(func=probe_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
