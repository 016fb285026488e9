"""Training batches of extracted latents: on the device when they fit, else read from the memory-mapped shards.

Both paths draw the same batches as the device-resident image set (one seeded permutation per epoch,
ranks taking disjoint consecutive slices, a flip per sample seeded by (seed, step, rank)), so a batch is
a pure function of the step: resume needs no saved state, and the two paths give identical batches.
A flip takes the stored latent of the flipped image (``--flip`` at extraction), not a flipped latent.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch

from .device_dataset import (_FLIP_STREAM, _PERMUTATION_STREAM, DeviceImageDataset, DeviceStream, _cpu_generator,
                             mix_seed)
from .errors import DatasetError
from .latent_store import LatentShards

DEVICE_SHARE = 0.25  # latents go on the device when they take at most this share of its free memory


class DeviceLatents(DeviceImageDataset):
    """fp16 latents [N, c, h, w] (and their flipped copies) resident on ``device``; the parent's batching."""

    def __init__(self, latents: torch.Tensor, flipped: Optional[torch.Tensor], labels: torch.Tensor,
                 device: torch.device | str = "cpu"):
        if latents.dim() != 4 or labels.shape != (latents.shape[0],):
            raise DatasetError(f"DeviceLatents needs latents [N, c, h, w] and N labels, got {list(latents.shape)} "
                               f"and {list(labels.shape)}")
        self.device = torch.device(device)
        self._images = latents.to(self.device).contiguous()
        self._flipped = None if flipped is None else flipped.to(self.device).contiguous()
        self._labels = labels.to(device=self.device, dtype=torch.int64)
        self._draws_key, self._draws = None, (torch.empty(0), None)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
              hflip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's float32 latents [batch_size, c, h, w] and labels of global batch ``step``."""
        if hflip and self._flipped is None:
            raise DatasetError("hflip needs the flipped copies; extract with --flip or set data.hflip=false")
        spe = self.steps_per_epoch(batch_size, world_size)
        if not 0 <= rank < world_size or step < 0:
            raise DatasetError(f"rank={rank} (world_size={world_size}) and step={step} are out of range")
        index, flips = self._epoch_draws(seed, step // spe, rank, world_size, batch_size, hflip)
        rows = index[step % spe]
        x = self._images.index_select(0, rows)
        if flips is not None:
            x = torch.where(flips[step % spe].view(-1, 1, 1, 1), self._flipped.index_select(0, rows), x)
        return x.float(), self._labels.index_select(0, rows)


def step_draws(n: int, step: int, batch_size: int, rank: int, world_size: int, seed: int, hflip: bool,
               perm_cache: dict) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """This rank's indices and flips of global batch ``step``: the numbers DeviceImageDataset draws."""
    spe = n // (batch_size * world_size)
    epoch, row = divmod(step, spe)
    if perm_cache.get("epoch") != epoch:
        perm_cache["epoch"] = epoch
        perm_cache["perm"] = torch.randperm(n, generator=_cpu_generator(mix_seed(_PERMUTATION_STREAM, seed, epoch)))
    first = row * batch_size * world_size + rank * batch_size
    index = perm_cache["perm"][first:first + batch_size].numpy()
    flips = None
    if hflip:
        flips = torch.randint(0, 2, (batch_size,), generator=_cpu_generator(mix_seed(_FLIP_STREAM, seed, step, rank)))
        flips = flips.numpy().astype(bool)
    return index, flips


class MmapLatentStream:
    """Latents read per step from the memory-mapped shards, only this rank's rows, one step ahead in a thread."""

    name = "latents-mmap"
    skipped = 0

    def __init__(self, shards: LatentShards, *, batch_size: int, rank: int, world_size: int, seed: int,
                 hflip: bool, device: torch.device, dtype: torch.dtype = torch.float32):
        if hflip and not shards.flipped:
            raise DatasetError("hflip needs the flipped copies; extract with --flip or set data.hflip=false")
        if len(shards) // (batch_size * world_size) == 0:
            raise DatasetError(f"the global batch ({batch_size} per rank x {world_size} ranks) is larger than the "
                               f"{len(shards)} latents; lower train.batch_size or extract more images")
        self.shards, self.device, self.dtype = shards, torch.device(device), dtype
        self.args = (batch_size, rank, world_size, seed, hflip)
        self._perm: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latents")
        self._ahead: Optional[tuple[int, Future]] = None

    def __len__(self) -> int:
        return len(self.shards)

    def _read(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, flips = step_draws(len(self.shards), step, *self.args[:4], self.args[4], self._perm)
        x = torch.from_numpy(self.shards.rows(index, flips))
        y = torch.from_numpy(self.shards.labels[index])
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step:
            x, y = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # a jump (resume, evaluation): let the read ahead finish, it shares the cache
            x, y = self._read(step)
        self._ahead = (step + 1, self._pool.submit(self._read, step + 1))
        x = x.to(self.device, non_blocking=True).to(self.dtype)
        return x, y.to(self.device, non_blocking=True)

    def state(self) -> Optional[bytes]:
        return None  # a pure function of the step

    def load_state(self, state: Optional[bytes]) -> None:
        pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead = None


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (CUDA), or the host's available memory (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def build_latent_data(d, lc, *, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device,
                      dtype: torch.dtype = torch.float32, say: Callable[[str], None] = lambda _: None):
    """The training stream of ``data.path``'s latents: device-resident or memory-mapped (``latents.resident``)."""
    shards = LatentShards(d.path, "train")
    budget = int(free_memory(device) * DEVICE_SHARE)
    resident = lc.resident if lc.resident != "auto" else ("device" if shards.nbytes <= budget else "stream")
    gb = shards.nbytes / 1e9
    if resident == "device":
        say(f"latents: {len(shards)} of {'x'.join(map(str, shards.shape))} ({gb:.2f} GB fp16) held on the "
            f"{device.type}")
        flipped = torch.from_numpy(shards.all_latents(True)) if d.hflip else None
        data = DeviceLatents(torch.from_numpy(shards.all_latents()), flipped, torch.from_numpy(shards.labels),
                             device)
        return DeviceStream(data, batch_size, rank, world_size, seed, d.hflip, dtype)
    say(f"latents: {len(shards)} of {'x'.join(map(str, shards.shape))} ({gb:.2f} GB fp16"
        + (f", over the {budget / 1e9:.2f} GB budget of the device" if lc.resident == "auto" else "")
        + ") streamed from memory-mapped shards")
    return MmapLatentStream(shards, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                            hflip=d.hflip, device=device, dtype=dtype)
