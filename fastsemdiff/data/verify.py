"""The start-up check of an image folder for the streaming loaders.

DALI's decoder stops the whole pipeline on the first file it cannot decode, so a damaged image
would crash training mid-epoch. Checking every file once before the first step (in threads: PIL
releases the GIL while decoding) moves that failure to the start, where a bad file is skipped and
counted, or reported as an error when ``data.bad_images=error``.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import DatasetError
from .image_folder import scan_image_folder

log = logging.getLogger(__name__)

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass
class CheckedImages:
    """The decodable files with their labels, and the files left out with the reason."""

    files: list[str]
    labels: list[int]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def check_images(path: str | Path, *, verify: str = "decode", bad_images: str = "skip",
                 mixed_channels: str = "convert", threads: int = 2) -> CheckedImages:
    """Scan ``path`` (folder or file list) and keep the images that open (``header``) or decode (``decode``)."""
    pairs, class_names = scan_image_folder(path)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda pair: _probe(pair[0], verify == "decode"), pairs))
    files, labels, skipped, grey, colour = [], [], [], [], []
    for (file, label), (mode, error) in zip(pairs, results):
        if error is not None:
            skipped.append((str(file), error))
            continue
        files.append(str(file))
        labels.append(label)
        (grey if mode in _GREY_MODES else colour).append(str(file))
    if skipped and bad_images == "error":
        raise DatasetError(f"{len(skipped)} of {len(pairs)} image files under {str(path)!r} cannot be read, e.g. "
                           f"{skipped[0][0]} ({skipped[0][1]}); replace or delete them, or set data.bad_images=skip "
                           f"to train without them")
    if not files:
        raise DatasetError(f"none of the {len(pairs)} image files under {str(path)!r} could be decoded (first: "
                           f"{skipped[0][0]}: {skipped[0][1]}); the files are corrupt or not images, replace them")
    if grey and colour and mixed_channels == "error":
        raise DatasetError(f"{str(path)!r} mixes {len(grey)} grey images (e.g. {grey[0]}) and {len(colour)} colour "
                           f"images (e.g. {colour[0]}); convert them to one kind, or set data.mixed_channels=convert "
                           f"to have every image converted to data.channels")
    if skipped:
        log.warning("%s: skipping %d unreadable image(s) of %d, e.g. %s (%s)", path, len(skipped), len(pairs),
                    *skipped[0])
    return CheckedImages(files, labels, class_names, skipped)


def _probe(file: Path, decode: bool) -> tuple[str, str | None]:
    """(PIL mode, None) when the file is usable, ('', reason) when it is not."""
    try:
        with Image.open(file) as img:
            mode = img.mode
            if decode:
                img.draft(mode, (16, 16))  # JPEG: decode at 1/8 scale, still reads every byte
                img.load()
            return mode, None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return "", f"{type(e).__name__}: {str(e)[:120]}"
