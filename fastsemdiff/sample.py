"""Look at what a run generates and what its embeddings keep.

    python -m fastsemdiff.sample --run RUN_DIR [--out DIR] [--n 64] [--steps 50] [--seed 0] [--t 0.0]
                                 [--sampler auto]

Writes samples.png (unconditional: z replaced by the null embedding) and reconstructions.png (top: the
first n test images; below: x0 -> z_t -> sample, so what survives is what z_t encodes).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .data import DatasetError
from .eval import default_out, load_data, load_run

PAD = 2  # pixels between grid cells, before upscaling
SCALE = 2  # nearest-neighbour upscale, so 28x28 images are visible on screen


def grid_size(n: int, height: int, width: int, nrow: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG save_image_grid writes for n images of height x width."""
    cols, rows = min(n, nrow), math.ceil(n / nrow)
    return (SCALE * (cols * (width + PAD) + PAD), SCALE * (rows * (height + PAD) + PAD))


def save_image_grid(images: torch.Tensor, path: Union[str, Path], nrow: int = 8) -> None:
    """Images [N, C, H, W] in [0, 1] as one PNG, ``nrow`` per row on a white background.

    1 channel gives a grayscale PNG and 3 an RGB one; PIL does the encoding, so no torchvision is needed.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {list(images.shape)}")
    n, c, h, w = images.shape
    width, height = grid_size(n, h, w, nrow)
    grid = torch.ones(c, height // SCALE, width // SCALE)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, col = divmod(i, nrow)
        top, left = PAD + r * (h + PAD), PAD + col * (w + PAD)
        grid[:, top:top + h, left:left + w] = img
    grid = grid.repeat_interleave(SCALE, dim=1).repeat_interleave(SCALE, dim=2)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    mode = "L" if c == 1 else "RGB"
    Image.fromarray(pixels[..., 0] if c == 1 else np.ascontiguousarray(pixels), mode=mode).save(path, format="PNG")


def pad_rows(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Blank (white) images appended up to a full row, so what follows starts on a new row."""
    extra = -images.shape[0] % nrow
    return torch.cat([images, images.new_ones(extra, *images.shape[1:])]) if extra else images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastsemdiff.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory holding model.safetensors (or the file)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: the run directory)")
    parser.add_argument("--n", type=int, default=64, help="number of samples and of reconstructions")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--t", type=float, default=0.0, help="time t of the embedding z_t to reconstruct from")
    parser.add_argument("--sampler", default="auto", choices=["auto", "ddim", "euler", "heun"],
                        help="auto: DDIM for VP schedules, Heun otherwise")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        _main(build_parser().parse_args(argv))
    except DatasetError as e:  # e.g. a latent-trained run whose VAE folder is gone
        raise SystemExit(f"error: {e}") from None


def _main(args: argparse.Namespace) -> None:
    if args.n < 1 or args.steps < 1:
        raise SystemExit("error: --n and --steps must be positive")
    if not 0.0 <= args.t <= 1.0:
        raise SystemExit(f"error: --t {args.t} must be in [0, 1] (0 = clean, 1 = pure noise)")
    model = load_run(args.run, args.device)
    out = Path(args.out) if args.out else default_out(args.run)
    out.mkdir(parents=True, exist_ok=True)
    nrow = max(1, math.ceil(math.sqrt(args.n)))

    with torch.inference_mode():
        samples = model.generate(args.n, None, args.steps, args.sampler, args.seed)
        save_image_grid(samples, out / "samples.png", nrow)
        images, _ = load_data(model.cfg, "test", args.n)
        # model.reconstruct with the chosen sampler: z_t of each image conditions the sampler.
        z = model.embed(images, args.t)
        recon = model.generate(images.shape[0], z, args.steps, args.sampler, args.seed)
        originals = model.as_images(images)  # latents: decoded through the run's VAE
        save_image_grid(torch.cat([pad_rows(originals, nrow), recon.cpu()]), out / "reconstructions.png", nrow)
    print(f"wrote {out / 'samples.png'} ({args.n} unconditional samples) and {out / 'reconstructions.png'} "
          f"(test images above, reconstructions from z_t at t={args.t:g} below; {args.steps} steps)")


if __name__ == "__main__":
    main()
