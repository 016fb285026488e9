"""Export embeddings of a dataset split for analysis outside this package.

    python -m fastsemdiff.embed --run RUN_DIR --out FILE.npz [--split test] [--ts 0 0.3] [--limit N]

The .npz holds ``z`` [N, len(ts) * d] (z_t for each t, concatenated in the order of ``ts``), ``labels``
[N] and ``ts``, so a notebook can probe or plot without importing torch or the model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .eval import check_ts, load_data, load_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastsemdiff.embed", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory holding model.safetensors (or the file)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--ts", type=float, nargs="+", default=None, help="diffusion times (default: eval.ts)")
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N images")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    model = load_run(args.run, args.device)
    cfg = model.cfg
    ts = check_ts(args.ts if args.ts is not None else cfg.eval.ts)
    images, labels = load_data(cfg, args.split, args.limit)
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
