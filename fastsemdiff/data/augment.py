"""PIL decoding and augmentation for the DataLoader path: the same crops and flips the DALI pipeline does.

Every random choice comes from a numpy generator the caller seeds per sample, so a batch is a pure
function of (seed, step, rank, position): worker scheduling cannot change it and resume repeats it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .image_folder import _decode

MODES = {1: "L", 3: "RGB"}
_RATIO = (3 / 4, 4 / 3)


def load_image(file: str | Path, size: int, channels: int, crop: str, scale: tuple[float, float],
               hflip: bool, rng: np.random.Generator) -> np.ndarray:
    """One image as uint8 [C, size, size]: centre or random resized crop, then a random flip."""
    if crop == "center":
        pixels = _decode(Path(file), size, MODES[channels])
    else:
        with Image.open(file) as img:
            img = ImageOps.exif_transpose(img).convert(MODES[channels])
        left, top, w, h = _random_box(img.size, scale, rng)
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        pixels = np.asarray(img, dtype=np.uint8)
    pixels = pixels.reshape(size, size, channels).transpose(2, 0, 1)
    if hflip and rng.integers(0, 2):
        pixels = pixels[:, :, ::-1]
    return np.ascontiguousarray(pixels)


def _random_box(size: tuple[int, int], scale: tuple[float, float], rng: np.random.Generator) -> tuple[int, ...]:
    """(left, top, width, height) of a crop covering a random share of the area at a random aspect ratio."""
    width, height = size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    side = min(width, height)  # fallback: the centred square
    return (width - side) // 2, (height - side) // 2, side, side
