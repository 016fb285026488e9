"""The fallback streaming loader: PIL in DataLoader worker processes, batches indexed by step.

Used for image folders when DALI is not installed (or ``data.loader=torch``). The batch sampler
hands out, for each step, this rank's slice of a seeded per-epoch permutation (the same layout as
the device-resident dataset) plus a per-sample seed, so resuming at step k needs no saved sampler
state: the stream simply starts at k.
"""
from __future__ import annotations

import itertools
import logging
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import load_image
from .device_dataset import _cpu_generator, mix_seed, to_model_range
from .errors import DatasetError
from .verify import CheckedImages

log = logging.getLogger(__name__)

_PERMUTATION_STREAM = 10
_SAMPLE_STREAM = 11


class _Images(Dataset):
    """Map-style: key (file index, sample seed) -> (uint8 [C, S, S], label, 1 if a stand-in was used)."""

    def __init__(self, checked: CheckedImages, size: int, channels: int, crop: str, scale: tuple[float, float],
                 hflip: bool):
        self.files, self.labels = checked.files, checked.labels
        self.args = (size, channels, crop, scale, hflip)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            try:
                pixels = load_image(self.files[i], *self.args, np.random.default_rng(seed))
                return torch.from_numpy(pixels), self.labels[i], int(attempt > 0)
            except (OSError, ValueError, SyntaxError) as e:  # it passed the start-up check, yet fails now
                log.warning("skipping %s: %s", self.files[i], e)
        raise DatasetError("no image in the folder can be decoded any more; check the folder")


class _StepBatches(Sampler):
    """Endless: for step = start, start + 1, ... this rank's [(file index, sample seed)] of that step."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start: int):
        self.n, self.b, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world_size, seed, start
        self.spe = steps_per_epoch(n, batch_size, world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, epoch = None, -1
        for step in itertools.count(self.start):
            if step // self.spe != epoch:
                epoch = step // self.spe
                perm = torch.randperm(self.n, generator=_cpu_generator(mix_seed(_PERMUTATION_STREAM, self.seed, epoch)))
            first = (step % self.spe) * self.b * self.world + self.rank * self.b
            index = perm[first : first + self.b].tolist()
            yield [(i, mix_seed(_SAMPLE_STREAM, self.seed, step, self.rank, j) >> 1) for j, i in enumerate(index)]


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    spe = n // (batch_size * world_size)
    if spe == 0:
        raise DatasetError(f"the global batch ({batch_size} per rank x {world_size} ranks) is larger than the "
                           f"{n} readable images; lower train.batch_size or add images")
    return spe


class TorchStream:
    """``batch(step)`` -> (float images in [-1, 1] [B, C, S, S] on ``device``, int64 labels)."""

    name = "torch"

    def __init__(self, checked: CheckedImages, *, image_size: int, channels: int, batch_size: int, rank: int,
                 world_size: int, seed: int, hflip: bool, crop: str, crop_scale: tuple[float, float], workers: int,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        self.checked, self.device, self.dtype = checked, torch.device(device), dtype
        self.dataset = _Images(checked, image_size, channels, crop, tuple(crop_scale), hflip)
        self.args = (len(checked), batch_size, rank, world_size, seed)
        self.spe = steps_per_epoch(len(checked), batch_size, world_size)
        self.workers = workers
        self._iter, self._next_step, self._stand_ins = None, -1, 0

    def __len__(self) -> int:
        return len(self.checked)

    @property
    def skipped(self) -> int:
        """Files left out at the start plus samples replaced because their file failed later."""
        return len(self.checked.skipped) + self._stand_ins

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None or step != self._next_step:
            self._iter = iter(self._loader(step))
        images, labels, stand_in = next(self._iter)
        self._next_step = step + 1
        self._stand_ins += int(stand_in.sum())
        images = images.to(self.device, non_blocking=True)
        return to_model_range(images).to(self.dtype), labels.to(self.device, torch.int64)

    def _loader(self, start: int) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=_StepBatches(*self.args, start=start), num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if self.workers else None)

    def state(self) -> bytes | None:
        return None  # a pure function of the step: nothing to save

    def load_state(self, state: bytes | None) -> None:
        pass

    def close(self) -> None:
        self._iter = None
