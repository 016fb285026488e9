"""Fashion-MNIST from its four idx files (the format LeCun's MNIST uses), gzip or not.

The whole set is 55 MB of uint8, so it is read into memory in one go; numpy's frombuffer turns each
file into an array without a per-item loop. Every way the files can be wrong becomes a DatasetError
that says what to do, because a bad download otherwise surfaces as a reshape error far from its cause.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"

# split -> (images file, labels file), without the optional ".gz".
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

_ALL_NAMES = [f"{name}.gz" for pair in SPLIT_FILES.values() for name in pair]
_INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (as root), or point data.path=... at a "
    f"folder holding the four files {', '.join(_ALL_NAMES)}"
)


def load_fashion_mnist(path: str = DEFAULT_PATH, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 1, 28, 28] and labels int64 [N] of one split ("train": 60000, "test": 10000)."""
    if split not in SPLIT_FILES:
        raise DatasetError(f"Fashion-MNIST split {split!r} is unknown; choose one of {sorted(SPLIT_FILES)}")
    folder = Path(path)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"Fashion-MNIST folder {str(folder)!r} {what}; {_INSTALL_HINT}")
    image_file, label_file = (_find(folder, name) for name in SPLIT_FILES[split])
    images = _parse_idx(_read(image_file), IMAGE_MAGIC, "image", image_file)
    labels = _parse_idx(_read(label_file), LABEL_MAGIC, "label", label_file)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DatasetError(
            f"{image_file} holds {images.shape[1]}x{images.shape[2]} images, but Fashion-MNIST "
            f"is {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}; replace the file with the original download"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"Fashion-MNIST {split} split has {len(images)} images but {len(labels)} labels; the image and "
            f"label files in {str(folder)!r} come from different downloads, replace both"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DatasetError(
            f"{label_file} holds label {int(labels.max())}, but Fashion-MNIST labels are "
            f"0..{NUM_CLASSES - 1}; the file is corrupt, replace it with the original download"
        )
    image_tensor = torch.from_numpy(images.reshape(len(images), 1, *IMAGE_SHAPE).copy())
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    return image_tensor, label_tensor


def _find(folder: Path, name: str) -> Path:
    """The file ``name`` or ``name.gz`` in ``folder``; the uncompressed one wins (no decompress)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"{str(folder)!r} has no {name}.gz (nor {name}); a Fashion-MNIST folder holds the files "
        f"{', '.join(_ALL_NAMES)} (gzipped or not); {_INSTALL_HINT}"
    )


def _read(file: Path) -> bytes:
    """The file's bytes, decompressed when it ends in ``.gz``."""
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as f:
                return f.read()
        return file.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"cannot read {file}: the gzip data is corrupt or cut short ({e}); download the file again "
            f"(or reinstall dataset-fashion-mnist)"
        ) from e


def _parse_idx(data: bytes, magic: int, kind: str, file: Path) -> np.ndarray:
    """An idx file's uint8 payload, shaped by the dimensions in its big-endian header."""
    if len(data) < 4:
        raise DatasetError(f"{file} is truncated or corrupt: {len(data)} bytes, shorter than an idx header")
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        raise DatasetError(
            f"{file} is not an idx {kind} file: magic number {found}, expected {magic}; check that the "
            f"file names were not swapped, or download the file again"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{file} is truncated or corrupt: expected a {header}-byte header, found {len(data)} bytes; "
            f"download the file again"
        )
    dims = struct.unpack(f">{ndim}i", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual != expected:
        raise DatasetError(
            f"{file} is truncated or corrupt: its header says {'x'.join(map(str, dims))}, i.e. {expected} "
            f"bytes of data, but it holds {actual}; download the file again"
        )
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)
