"""The pretrained VAE of latent training: loaded from a local folder, identified by a hash, and used to
move images into the latent space the model trains in and back.

diffusers is needed only here and only when latents are made or decoded, so it stays an optional
dependency: without it the error names ``pip install diffusers``. Latents are stored scaled,
``(mean - shift_factor) * scaling_factor``, as DiT and LightningDiT train on them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .data.device_dataset import images_to_model_range
from .data.errors import DatasetError

CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class VAEError(DatasetError):
    """A VAE folder that is missing, is not a diffusers AutoencoderKL, or is not the VAE the latents need."""


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise VAEError("latents need diffusers for the VAE, which is not installed; run pip install diffusers "
                       "(or pip install -e '.[dev]')") from None
    return diffusers


def _vae_files(folder: Path) -> list[Path]:
    """The files that define the VAE: its config and weights (the variant a plain from_pretrained loads)."""
    return [folder / CONFIG_FILE] + sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def check_vae_folder(path: Union[str, Path]) -> Path:
    """The VAE folder as an absolute path, or a VAEError saying what is missing and how to get a VAE there."""
    folder = Path(path).expanduser()
    fix = ("point --vae / latents.vae at a folder written by AutoencoderKL.save_pretrained (config.json and "
           "diffusion_pytorch_model.safetensors), e.g. a downloaded stabilityai/sd-vae-ft-ema")
    if not folder.is_dir():
        raise VAEError(f"VAE folder {str(folder)!r} {'is a file' if folder.exists() else 'does not exist'}; {fix}")
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise VAEError(f"{folder} has no {CONFIG_FILE}, so it holds no diffusers model; {fix}")
    try:
        cls = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise VAEError(f"{config} is not a readable diffusers config ({e}); {fix}") from None
    if cls != "AutoencoderKL":
        raise VAEError(f"{folder} holds a {cls or 'model without _class_name'}, not an AutoencoderKL; {fix}")
    if len(_vae_files(folder)) < 2:
        raise VAEError(f"{folder} has a config but no weights (*.safetensors or *.bin); {fix}")
    return folder.resolve()


def vae_hash(path: Union[str, Path]) -> str:
    """sha256 over the VAE's config and weight files (names and bytes): another VAE, or the same one retrained,
    gets another hash, while a copy in another folder keeps it."""
    folder = check_vae_folder(path)
    h = hashlib.sha256()
    for f in _vae_files(folder):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def load_vae(path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """The AutoencoderKL saved in a local folder (nothing is fetched), in eval mode without gradients."""
    folder = check_vae_folder(path)
    diffusers = _diffusers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise VAEError(f"cannot load an AutoencoderKL from {folder} ({type(e).__name__}: {e}); the folder is "
                       f"damaged or incomplete, save the VAE again with save_pretrained") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE's config (shift 0 when it has none, as SD's VAEs)."""
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    return float(scale if scale is not None else 1.0), float(shift if shift is not None else 0.0)


class LatentCodec:
    """Images <-> the scaled latents the model trains on, through the VAE a run's latents came from.

    A plain object, not an nn.Module, so the VAE is never part of the model's state dict, optimiser or
    sharding; it is loaded on first use (the probe on stored latents never needs it) and its hash is
    checked against the one the latents were made with.
    """

    def __init__(self, path: str, expected_hash: str, scaling_factor: float, shift_factor: float,
                 image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int]):
        self.path, self.expected_hash = path, expected_hash
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.image_shape, self.latent_shape = tuple(image_shape), tuple(latent_shape)
        self._vae = None

    def vae(self, device: torch.device):
        if self._vae is None:
            found = vae_hash(self.path)
            if self.expected_hash and found != self.expected_hash:
                raise VAEError(f"the VAE at {self.path} is not the one the latents were encoded with (hash "
                               f"{found[:12]} against {self.expected_hash[:12]}); set latents.vae to that VAE's "
                               f"folder, or extract the latents again with this one")
            self._vae = load_vae(self.path, device)
        return self._vae.to(device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
        """Images [B, C, H, W] (uint8 or float 0..1) -> scaled latents float32 [B, c, h, w] on ``device``."""
        vae, out = self.vae(device), []
        for i in range(0, images.shape[0], batch_size):
            x = images_to_model_range(images[i:i + batch_size].to(device))
            with _autocast(device):
                mean = vae.encode(x).latent_dist.mean
            out.append((mean.float() - self.shift_factor) * self.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Scaled latents [B, c, h, w] -> images float32 [B, C, H, W] in [0, 1], on the latents' device."""
        device = latents.device
        vae, out = self.vae(device), []
        for i in range(0, latents.shape[0], batch_size):
            z = latents[i:i + batch_size].float() / self.scaling_factor + self.shift_factor
            with _autocast(device):
                x = vae.decode(z).sample
            out.append(((x.float() + 1) / 2).clamp(0, 1))
        return torch.cat(out)


def _autocast(device: torch.device):
    """bf16 on a GPU (how the VAE is run at scale), full precision on a CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def codec_for(cfg) -> Optional[LatentCodec]:
    """The codec of a config trained on latents (its ``latents`` keys filled from the manifest), else None."""
    if cfg.data.source != "latents":
        return None
    lc, d = cfg.latents, cfg.data
    return LatentCodec(lc.vae, lc.vae_hash, lc.scaling_factor, lc.shift_factor,
                       (d.channels, d.image_size, d.image_size), (lc.channels, lc.size, lc.size))
