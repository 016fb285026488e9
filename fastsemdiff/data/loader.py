"""The training data source, chosen from ``data.source`` and ``data.loader``.

Arrays that fit in device memory (Fashion-MNIST, .npz/.npy) stay on the device and are batched
there; image folders stream through DALI when it is installed, else through PIL DataLoader workers;
extracted VAE latents stay on the device when they fit and are read from memory-mapped shards otherwise.
Every choice has the same small interface (``batch(step)``, ``state()``, ``load_state()``,
``skipped``), so the trainer does not care which one it got.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from .dali_stream import DaliStream, dali_available
from .device_dataset import DeviceImageDataset, DeviceStream
from .errors import DatasetError
from .latent_data import build_latent_data
from .splits import load_split, split_path
from .torch_stream import TorchStream
from .verify import check_images


class TrainData(Protocol):
    name: str

    def __len__(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state(self) -> Optional[bytes]: ...
    def load_state(self, state: Optional[bytes]) -> None: ...
    def close(self) -> None: ...


def choose_loader(source: str, loader: str) -> str:
    """'device', 'dali', 'torch' or 'latents' for this source and ``data.loader``; a clear error when they do not fit."""
    if source == "latents":
        if loader != "auto":
            raise DatasetError(f"data.loader={loader} streams image folders; latents are held on the device or "
                               f"memory-mapped (latents.resident=auto|device|stream); leave data.loader=auto")
        return "latents"
    if source != "folder":
        if loader != "auto":
            raise DatasetError(f"data.loader={loader} streams image folders, but data.source={source} is held on the "
                               f"device and batched there; leave data.loader=auto, or use data.source=folder")
        return "device"
    if loader == "dali" and not dali_available():
        raise DatasetError("data.loader=dali needs NVIDIA DALI, which is not installed; install the extra with "
                           "pip install -e '.[dali]' (nvidia-dali-cuda130), or set data.loader=torch")
    if loader == "auto":
        return "dali" if dali_available() else "torch"
    return loader


def build_train_data(d, *, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device,
                     dtype: torch.dtype = torch.float32, say: Callable[[str], None] = lambda _: None,
                     latents=None) -> TrainData:
    """This rank's training stream for the ``data`` config section ``d`` (and ``latents``, the config's section
    of that name, for data.source=latents); ``say`` prints a one-time note."""
    kind = choose_loader(d.source, d.loader)
    if kind == "latents":
        from ..config import LatentsConfig

        return build_latent_data(d, latents or LatentsConfig(), batch_size=batch_size, rank=rank,
                                 world_size=world_size, seed=seed, device=device, dtype=dtype, say=say)
    if kind == "device":
        images, labels = load_split(d.source, d.path, "train", d.image_size, d.channels)
        return DeviceStream(DeviceImageDataset(images, labels, device), batch_size, rank, world_size, seed, d.hflip,
                            dtype)
    if d.channels not in (1, 3):
        raise DatasetError(f"data.channels={d.channels} is not supported for image folders; use 1 (grey) or 3 (RGB)")
    checked = check_images(split_path(Path(d.path), "train"), verify=d.verify, bad_images=d.bad_images, mixed_channels=d.mixed_channels,
                           threads=max(1, d.workers))
    if checked.skipped:
        say(f"skipping {len(checked.skipped)} unreadable image(s) of {len(checked) + len(checked.skipped)}, e.g. "
            f"{checked.skipped[0][0]} ({checked.skipped[0][1]}); set data.bad_images=error to stop instead")
    if kind == "torch" and d.loader == "auto":
        say(f"DALI is not installed (pip install -e '.[dali]'), so the folder is read with PIL in "
            f"{d.workers} DataLoader worker(s)")
    stream = DaliStream if kind == "dali" else TorchStream
    return stream(checked, image_size=d.image_size, channels=d.channels, batch_size=batch_size, rank=rank,
                  world_size=world_size, seed=seed, hflip=d.hflip, crop=d.crop, crop_scale=tuple(d.crop_scale),
                  workers=d.workers, device=device, dtype=dtype)
