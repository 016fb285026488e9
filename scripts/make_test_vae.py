"""Write a tiny randomly initialised diffusers AutoencoderKL to a folder, to try latent training on a CPU.

    python scripts/make_test_vae.py OUT_DIR [--channels 1] [--seed 0]

It downsamples by 2 (28x28x1 -> 4x14x14) and has 8 and 16 channels, so extracting Fashion-MNIST takes
about a minute on 2 cores. Its latents mean nothing (the weights are random): it stands in for a real
pretrained VAE (e.g. stabilityai/sd-vae-ft-ema, 256x256x3 -> 4x32x32) so the commands can be run anywhere.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def make_test_vae(folder: Path, channels: int = 1, seed: int = 0, scaling_factor: float = 0.18215,
                  shift_factor: float | None = None) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=28, scaling_factor=scaling_factor,
                        shift_factor=shift_factor)
    vae.save_pretrained(str(folder))
    return Path(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write (config.json and diffusion_pytorch_model.safetensors)")
    p.add_argument("--channels", type=int, default=1, help="image channels: 1 (grey) or 3 (RGB)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"wrote a random AutoencoderKL ({args.channels} -> 4 channels, /2) to {make_test_vae(args.out, args.channels, args.seed)}")


if __name__ == "__main__":
    main()
