"""Image arrays from a .npz or .npy file (CIFAR-sized sets saved with numpy), as uint8 [N, C, H, W].

Such sets fit on the accelerator, so they take the device-resident path like Fashion-MNIST. The
layout is read from the shape (channel-first or channel-last), and anything that would silently
train on the wrong thing (floats, wrong size, wrong channel count) stops the run at start.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

# Accepted .npz layouts: Keras-style x_<split>/y_<split>, or one unsplit images/labels pair (train only).
_LAYOUT_HINT = ("an .npz needs arrays x_train, y_train (and x_test, y_test for a test split), or images and "
                "labels; an .npy holds the images alone (labels all 0)")


def load_arrays(path: str | Path, split: str, image_size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, C, S, S] and labels int64 [N] of one split of an .npz/.npy file."""
    file = Path(path)
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise DatasetError(f"array file {str(file)!r} {what}; point data.path=... at an .npz or .npy file "
                           f"({_LAYOUT_HINT})")
    images, labels = _read(file, split)
    images = _to_nchw(images, file, channels)
    n, _, h, w = images.shape
    if (h, w) != (image_size, image_size):
        raise DatasetError(f"{file} holds {h}x{w} images but data.image_size={image_size}; "
                           f"set data.image_size={h}" + ("" if h == w else " after resizing them to a square"))
    if labels is None:
        labels = np.zeros(n, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{file}: {n} images need {n} integer labels, got {labels.dtype} {list(labels.shape)}")
    if n == 0:
        raise DatasetError(f"{file} holds no images for the {split} split")
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def _read(file: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if file.suffix == ".npy":
            if split != "train":
                raise DatasetError(f"{file} is a single .npy array, so it has no {split} split; {_LAYOUT_HINT}")
            return np.load(file, allow_pickle=False), None
        with np.load(file, allow_pickle=False) as z:
            keys = set(z.files)
            if {f"x_{split}", f"y_{split}"} <= keys:
                return z[f"x_{split}"], z[f"y_{split}"]
            if {"images", "labels"} <= keys and split == "train":
                return z["images"], z["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"cannot read {file} as numpy arrays ({e}); the file is corrupt or not an "
                           f".npz/.npy, write it again with numpy.savez / numpy.save") from None
    raise DatasetError(f"{file} has no arrays for the {split} split (found {sorted(keys)}); {_LAYOUT_HINT}")


def _to_nchw(images: np.ndarray, file: Path, channels: int) -> np.ndarray:
    """[N, H, W] (grey), [N, H, W, C] or [N, C, H, W] with C in {1, 3} -> [N, C, H, W]."""
    if images.dtype != np.uint8:
        raise DatasetError(f"{file} holds {images.dtype} images; store uint8 pixels 0..255 "
                           f"(e.g. (x * 255).round().astype(np.uint8))")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif not (images.ndim == 4 and images.shape[1] in (1, 3)):
        raise DatasetError(f"{file} holds images of shape {list(images.shape)}; expected [N, H, W], "
                           f"[N, H, W, C] or [N, C, H, W] with C = 1 or 3")
    if images.shape[1] != channels:
        raise DatasetError(f"{file} holds {images.shape[1]}-channel images but data.channels={channels}; "
                           f"set data.channels={images.shape[1]}")
    return images
