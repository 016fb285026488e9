"""The DALI image pipeline: read, decode, crop, resize, flip and scale an image folder, sharded per rank.

DALI is optional (extra ``dali``), so it is imported only here and only when the pipeline is built.
Decoding is "mixed" (nvJPEG on the GPU) when training on CUDA and "cpu" otherwise. The reader's
state is checkpointed by DALI itself (``enable_checkpointing``); ``state()`` returns it for the
training checkpoint and ``load_state`` makes the rebuilt pipeline continue with the same batches.
"""
from __future__ import annotations

import importlib.util

import torch

from .device_dataset import mix_seed
from .errors import DatasetError
from .torch_stream import steps_per_epoch
from .verify import CheckedImages

_READER = "Reader"
_SEED_MASK = (1 << 31) - 1  # DALI seeds are 32-bit signed


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def decoder_device(device: torch.device) -> str:
    """"mixed" (GPU decode) when training on CUDA, "cpu" otherwise (a CPU-only pipeline has no device)."""
    return "mixed" if torch.device(device).type == "cuda" and torch.cuda.is_available() else "cpu"


class DaliStream:
    """``batch(step)`` -> (images in [-1, 1] [B, C, S, S] on ``device`` in ``dtype``, int64 labels)."""

    name = "dali"

    def __init__(self, checked: CheckedImages, *, image_size: int, channels: int, batch_size: int, rank: int,
                 world_size: int, seed: int, hflip: bool, crop: str, crop_scale: tuple[float, float], workers: int,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        if not dali_available():
            raise DatasetError("data.loader=dali needs NVIDIA DALI, which is not installed; install the extra with "
                               "pip install -e '.[dali]' (nvidia-dali-cuda130), or set data.loader=torch")
        if channels not in (1, 3):
            raise DatasetError(f"data.channels={channels} is not supported for image folders; use 1 or 3")
        steps_per_epoch(len(checked) // world_size, batch_size, 1)  # each rank's shard must hold a batch
        self.checked, self.device, self.dtype = checked, torch.device(device), dtype
        self.size, self.channels, self.batch_size = image_size, channels, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.hflip, self.crop, self.crop_scale, self.workers = hflip, crop, list(crop_scale), workers
        self._checkpoint: bytes | None = None
        self._iter = None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.checked)

    @property
    def skipped(self) -> int:
        return len(self.checked.skipped)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = self._build()
        for _ in range(2):  # a StopIteration ends the epoch; auto_reset has started the next one
            try:
                out = next(self._iter)[0]
                break
            except StopIteration:
                self.epoch += 1
            except RuntimeError as e:
                raise DatasetError(f"DALI could not read a batch ({str(e).strip().splitlines()[0][:300]}); a file "
                                   f"under {self.checked.files[0].rsplit('/', 1)[0]!r} changed or broke after the "
                                   f"start-up check: restart the run (it skips the file), or use "
                                   f"data.loader=torch") from None
        else:
            raise DatasetError("the DALI reader returned no batch; lower train.batch_size or add images")
        images = out["images"].to(self.device, self.dtype, non_blocking=True)
        return images, out["labels"].view(-1).to(self.device, torch.int64)

    def state(self) -> bytes | None:
        """DALI's serialized reader and RNG state after the last batch taken (None before the first)."""
        if self._iter is None:
            return self._checkpoint
        return self._iter.checkpoints()[0]

    def load_state(self, state: bytes | None) -> None:
        """Continue from ``state`` (from ``state()`` of the same folder, rank and world size)."""
        self._checkpoint, self._iter = state, None

    def close(self) -> None:
        self._iter = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types  # noqa: PLC0415 (optional dependency)
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy  # noqa: PLC0415

        decoder = decoder_device(self.device)
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if decoder == "mixed" else None
        size, scale = self.size, self.crop_scale
        # DALI reshuffles after each epoch with a fixed seed of its own, so the list it starts from is
        # permuted here with ours (the same on every rank, which keeps the shards disjoint).
        order = torch.randperm(len(self.checked), generator=torch.Generator().manual_seed(mix_seed(3, self.seed)))
        file_list = [self.checked.files[i] for i in order.tolist()]
        label_list = [self.checked.labels[i] for i in order.tolist()]
        image_type = types.GRAY if self.channels == 1 else types.RGB

        @pipeline_def(enable_checkpointing=True)
        def pipeline():
            encoded, labels = fn.readers.file(
                files=file_list, labels=label_list, name=_READER, shard_id=self.rank, num_shards=self.world_size,
                shuffle_after_epoch=True,
            )
            if self.crop == "random":
                images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=image_type,
                                                       random_area=scale, random_aspect_ratio=[3 / 4, 4 / 3])
                images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
            else:
                images = fn.decoders.image(encoded, device=decoder, output_type=image_type)
                images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip() if self.hflip else 0
            images = fn.crop_mirror_normalize(images, crop=[size, size], dtype=types.FLOAT, output_layout="CHW",
                                              mean=[127.5] * self.channels, std=[127.5] * self.channels,
                                              mirror=mirror)
            return images, labels

        pipe = pipeline(batch_size=self.batch_size, num_threads=max(1, self.workers), device_id=device_id,
                        seed=mix_seed(4, self.seed, self.rank) & _SEED_MASK, checkpoint=self._checkpoint)
        try:
            return DALIGenericIterator([pipe], ["images", "labels"], reader_name=_READER, auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.DROP)
        except RuntimeError as e:
            raise DatasetError(f"the DALI pipeline could not be built ({str(e).strip().splitlines()[0][:300]}); "
                               "if resuming, the folder or the number of processes changed since the checkpoint: "
                               "start a new train.run_dir") from None
