"""A folder of the user's own images, decoded with PIL into one uint8 tensor.

Meant for small sets that fit in memory (a few thousand images); large sets get a streaming loader.
A file PIL cannot decode is skipped and reported rather than fatal, because one bad download in a
scraped folder should not cost the whole run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MODES = {1: "L", 3: "RGB"}
FLAT_CLASS_NAME = "all"


@dataclass
class ImageFolderData:
    """What ``load_image_folder`` read: images uint8 [N, C, S, S], labels int64 [N], and the skipped files."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_image_folder(path: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) pairs in a stable order, and the class names, without decoding anything.

    Subfolders holding images are classes (label = index in sorted order, images found at any depth);
    with no such subfolder, the folder's own images form the single class "all". A text file instead
    of a folder is a file list (see ``read_file_list``).
    """
    root = Path(path)
    if root.is_file() and root.suffix.lower() not in IMAGE_EXTENSIONS:
        return read_file_list(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"image folder {str(root)!r} {what}; point data.path=... at a folder of images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(d, sorted(f for f in d.rglob("*") if is_image_file(f))) for d in subdirs]
    classes = [(d, files) for d, files in classes if files]
    top_level = sorted(f for f in root.iterdir() if is_image_file(f))
    if classes:
        if top_level:
            log.warning(
                "%s: ignoring %d image(s) beside the class subfolders; move them into a class folder",
                root, len(top_level),
            )
        pairs = [(f, label) for label, (_, files) in enumerate(classes) for f in files]
        return pairs, [d.name for d, _ in classes]
    if not top_level:
        raise DatasetError(
            f"image folder {str(root)!r} holds no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}); "
            f"put images in it, or in one subfolder per class"
        )
    return [(f, 0) for f in top_level], [FLAT_CLASS_NAME]


def load_image_folder(path: str | Path, image_size: int, channels: int) -> ImageFolderData:
    """Every image under ``path``, short side resized to ``image_size`` (bicubic) and centre-cropped."""
    if channels not in _MODES:
        raise DatasetError(f"data.channels={channels} is not supported for image folders; use 1 (grey) or 3 (RGB)")
    if image_size < 1:
        raise DatasetError(f"data.image_size={image_size} must be a positive number of pixels")
    pairs, class_names = scan_image_folder(path)
    images = np.empty((len(pairs), channels, image_size, image_size), dtype=np.uint8)
    labels: list[int] = []
    skipped: list[str] = []
    for file, label in pairs:
        try:
            pixels = _decode(file, image_size, _MODES[channels])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append(str(file))
            log.debug("skipping %s: %s", file, e)
            continue
        images[len(labels)] = pixels.reshape(image_size, image_size, channels).transpose(2, 0, 1)
        labels.append(label)
    if not labels:
        raise DatasetError(
            f"none of the {len(pairs)} image files under {str(path)!r} could be decoded (first: {skipped[0]}); "
            f"the files are corrupt or not images, replace them"
        )
    if skipped:
        log.warning(
            "%s: skipped %d unreadable image(s) of %d, e.g. %s", path, len(skipped), len(pairs), skipped[0]
        )
    return ImageFolderData(
        images=torch.from_numpy(images[: len(labels)].copy()),
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=class_names,
        skipped=skipped,
    )


def _decode(file: Path, size: int, mode: str) -> np.ndarray:
    """One image as uint8 [S, S] or [S, S, 3]: upright (EXIF), converted, resized, centre-cropped."""
    with Image.open(file) as img:
        img = ImageOps.exif_transpose(img).convert(mode)
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def read_file_list(list_file: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """A file list: one ``relative/or/absolute/path [label]`` per line (``#`` comments), relative to the list's folder.

    Labels are non-negative integers (0 when left out); the class names are the labels as text.
    """
    pairs: list[tuple[Path, int]] = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, label = line.rpartition(" ") if line.rsplit(" ", 1)[-1].isdigit() and " " in line else (line, "", "0")
        file = Path(name.strip())
        pairs.append((file if file.is_absolute() else list_file.parent / file, int(label)))
    if not pairs:
        raise DatasetError(f"file list {str(list_file)!r} names no images; write one 'path label' per line")
    missing = [str(f) for f, _ in pairs if not f.is_file()]
    if missing:
        raise DatasetError(f"file list {str(list_file)!r} names {len(missing)} file(s) that do not exist, e.g. "
                           f"{missing[0]}; paths are relative to the list's folder, fix or remove those lines")
    classes = sorted({label for _, label in pairs})
    return pairs, [str(c) for c in classes]
