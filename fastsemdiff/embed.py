"""Export embeddings of a dataset split for analysis outside this package.

    python -m fastsemdiff.embed --run RUN_DIR --out FILE.npz [--split test] [--ts 0 0.3] [--limit N] [--images]

The .npz holds ``z`` [N, len(ts) * d] (z_t for each t, concatenated in the order of ``ts``), ``labels``
[N] and ``ts``, so a notebook can probe or plot without importing torch or the model. A run trained on
VAE latents embeds the stored latents of the split, or with ``--images`` the images they were extracted
from (the manifest's source), encoded through the run's VAE first.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .data import DatasetError, read_manifest
from .eval import check_ts, load_data, load_run


def image_source(cfg):
    """The config of the images a latent-trained run's latents were extracted from (as their manifest says)."""
    if cfg.data.source != "latents":
        raise SystemExit("error: --images is for runs trained on latents (data.source=latents); this run was "
                         f"trained on {cfg.data.source} images, which it embeds without it")
    try:
        image = read_manifest(cfg.data.path)["image"]
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = copy.deepcopy(cfg)
    cfg.data.source, cfg.data.path = image["source"], image["path"]
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastsemdiff.embed", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory holding model.safetensors (or the file)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--ts", type=float, nargs="+", default=None, help="diffusion times (default: eval.ts)")
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N images")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    parser.add_argument("--images", action="store_true",
                        help="a run trained on latents: embed the images the latents came from, through its VAE")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        _main(build_parser().parse_args(argv))
    except DatasetError as e:  # e.g. a latent-trained run whose VAE folder is gone
        raise SystemExit(f"error: {e}") from None


def _main(args: argparse.Namespace) -> None:
    model = load_run(args.run, args.device)
    cfg = model.cfg
    ts = check_ts(args.ts if args.ts is not None else cfg.eval.ts)
    images, labels = load_data(image_source(cfg) if args.images else cfg, args.split, args.limit)
    start = time.perf_counter()
    with torch.inference_mode():
        z = model.embed_multi(images, ts, args.batch_size or cfg.eval.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, z=z.cpu().numpy(), labels=labels.numpy(), ts=np.asarray(ts, dtype=np.float32))
    print(f"wrote {out}: z {list(z.shape)} for {len(labels)} {args.split} images at t in {ts} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
