"""The whole training set resident on the accelerator, batched without a DataLoader.

Small image sets (Fashion-MNIST is 47 MB as uint8) fit on the device many times over, so copying
them once and slicing per step removes host decoding and host-to-device traffic from the training
loop. Each batch is a pure function of (seed, step, rank, world_size, batch_size), so a resumed or
re-sharded run sees exactly the data it would have seen, with no sampler state to checkpoint.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import DatasetError

_MASK64 = (1 << 64) - 1
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (0 -> -1, 255 -> 1 exactly), on the same device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got {images.dtype}; pass the raw images")
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def images_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float 0..1 -> float32 in [-1, 1]: what the networks see, and the range diffusers'
    VAEs are trained on (the latent extraction feeds them the same). Pixels go through ``to_model_range``,
    the training batches' own scaling."""
    if images.dtype == torch.uint8:
        return to_model_range(images)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    return images.float() * 2.0 - 1.0


def mix_seed(*values: int) -> int:
    """A well-spread 64-bit seed from integers (splitmix64 steps), so nearby steps get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


def _cpu_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


class DeviceImageDataset:
    """uint8 images [N, C, H, W] and int64 labels [N], copied to ``device`` once and batched there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu"):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(
                f"DeviceImageDataset needs uint8 images [N, C, H, W], got {images.dtype} {list(images.shape)}; "
                f"pass the loader's raw pixels, not normalised floats"
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise DatasetError(
                f"DeviceImageDataset got {len(images)} images but labels of shape {list(labels.shape)}; "
                f"pass one label per image"
            )
        self.device = torch.device(device)
        self._images = images.to(self.device).contiguous()
        self._labels = labels.to(device=self.device, dtype=torch.int64)
        self._draws_key: tuple | None = None
        self._draws: tuple[torch.Tensor, torch.Tensor | None] = (torch.empty(0), None)

    def __len__(self) -> int:
        return self._images.shape[0]

    @property
    def num_channels(self) -> int:
        return self._images.shape[1]

    @property
    def image_size(self) -> int:
        """The height (the loaders produce square images)."""
        return self._images.shape[2]

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def all_images(self) -> torch.Tensor:
        """Every image, uint8 [N, C, H, W] on the device (for evaluation and embedding export)."""
        return self._images

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Full global batches per pass; the remainder N mod (batch_size*world_size) waits for the next epoch."""
        if batch_size < 1 or world_size < 1:
            raise DatasetError(f"batch_size={batch_size} and world_size={world_size} must both be at least 1")
        spe = len(self) // (batch_size * world_size)
        if spe == 0:
            raise DatasetError(
                f"the global batch ({batch_size} per rank x {world_size} ranks = {batch_size * world_size}) is "
                f"larger than the dataset ({len(self)} images); lower train.batch_size or add images"
            )
        return spe

    def batch(
        self,
        step: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        hflip: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``step``: float32 images in [-1, 1] [batch_size, C, H, W], labels.

        Ranks take consecutive, disjoint slices of one per-epoch permutation, so together they cover
        the epoch without overlap; ``batch_size`` is per rank.
        """
        spe = self.steps_per_epoch(batch_size, world_size)
        if not 0 <= rank < world_size:
            raise DatasetError(f"rank={rank} is outside 0..{world_size - 1} for world_size={world_size}")
        if step < 0:
            raise DatasetError(f"step={step} must be >= 0")
        index, flips = self._epoch_draws(seed, step // spe, rank, world_size, batch_size, hflip)
        row = step % spe
        images = self._images.index_select(0, index[row])
        labels = self._labels.index_select(0, index[row])
        if flips is not None:
            images = torch.where(flips[row].view(-1, 1, 1, 1), images.flip(-1), images)
        return to_model_range(images), labels

    def _epoch_draws(self, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
                     hflip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's indices [steps, batch] and flips [steps, batch] for a whole epoch, on the device.

        Drawn once per epoch on the CPU (the same numbers on every device type, and the same as a
        per-step draw would give), so a training step does no host work and no host-to-device copy.
        """
        key = (seed, epoch, rank, world_size, batch_size, hflip)
        if self._draws_key != key:
            spe = self.steps_per_epoch(batch_size, world_size)
            perm = torch.randperm(len(self), generator=_cpu_generator(mix_seed(_PERMUTATION_STREAM, seed, epoch)))
            g = batch_size * world_size
            index = perm[: spe * g].view(spe, g)[:, rank * batch_size : (rank + 1) * batch_size]
            flips = None
            if hflip:
                flips = torch.stack([
                    torch.randint(0, 2, (batch_size,), generator=_cpu_generator(mix_seed(_FLIP_STREAM, seed, s, rank)))
                    for s in range(epoch * spe, (epoch + 1) * spe)
                ]).to(device=self.device, dtype=torch.bool)
            self._draws = (index.contiguous().to(self.device), flips)
            self._draws_key = key
        return self._draws


class DeviceStream:
    """The device-resident dataset behind the training-stream interface (``loader.TrainData``): a batch is a
    function of the step. It lives beside the dataset, not in loader.py, so that latent_data.py (which the loader
    imports) can hand out device-resident latents without importing the loader back."""

    name = "device"
    skipped = 0

    def __init__(self, data: DeviceImageDataset, batch_size: int, rank: int, world_size: int, seed: int,
                 hflip: bool, dtype: torch.dtype = torch.float32):
        data.steps_per_epoch(batch_size, world_size)  # fail at start, not at the first step
        self.data, self.dtype = data, dtype
        self.args = (batch_size, rank, world_size, seed, hflip)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.data.batch(step, *self.args)
        return images.to(self.dtype), labels

    def state(self) -> Optional[bytes]:
        return None

    def load_state(self, state: Optional[bytes]) -> None:
        pass

    def close(self) -> None:
        pass
