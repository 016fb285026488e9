"""One split of any source as uint8 images and labels (evaluation, probes and device-resident training)."""
from __future__ import annotations

from pathlib import Path

import torch

from .arrays import load_arrays
from .errors import DatasetError
from .fashion_mnist import load_fashion_mnist
from .image_folder import load_image_folder, scan_image_folder
from .latent_store import LatentShards

SOURCES = ("fashion-mnist", "folder", "npz", "latents")
SPLITS = ("train", "test")


def load_split(source: str, path: str, split: str, image_size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, C, S, S] and labels int64 [N] of one split, whatever the source (``data.*`` keys); for
    data.source=latents the stored latents instead, float16 [N, c, h, w] (what a latent-trained model embeds)."""
    if split not in SPLITS:
        raise DatasetError(f"split {split!r} is unknown; choose one of {list(SPLITS)}")
    if source == "fashion-mnist":
        if (image_size, channels) != (28, 1):
            raise DatasetError(
                f"Fashion-MNIST is 28x28 with 1 channel, but data.image_size={image_size} and "
                f"data.channels={channels}; set data.image_size=28 data.channels=1"
            )
        return load_fashion_mnist(path, split)
    if source == "folder":
        data = load_image_folder(split_path(Path(path), split), image_size, channels)
        return data.images, data.labels
    if source == "npz":
        return load_arrays(path, split, image_size, channels)
    if source == "latents":
        shards = LatentShards(path, split)
        return torch.from_numpy(shards.all_latents()), torch.from_numpy(shards.labels.copy())
    raise DatasetError(f"data.source={source!r} is unknown; choose one of {list(SOURCES)}")


def split_path(root: Path, split: str) -> Path:
    """``root/<split>`` when root has both train/ and test/; otherwise root itself is the train split."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        _, train_classes = scan_image_folder(root / "train")
        _, test_classes = scan_image_folder(root / "test")
        if train_classes != test_classes:
            raise DatasetError(
                f"{root}/train has classes {train_classes} but {root}/test has {test_classes}, so their labels "
                f"would not match; give both splits the same class subfolders"
            )
        return root / split
    if split == "test":
        raise DatasetError(
            f"image folder {str(root)!r} has no test split; to evaluate on held-out images, put them in "
            f"{root}/test and the training images in {root}/train (each with the same class subfolders)"
        )
    return root
