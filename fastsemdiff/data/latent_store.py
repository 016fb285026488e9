"""The on-disk form of extracted latents: a manifest and memory-mappable fp16 shards per split.

    OUT/manifest.json                   what the latents are (VAE, scaling, shapes, counts, shards)
    OUT/train-00000.latents.npy         float16 [n, c, h, w], the scaled VAE means of the images in order
    OUT/train-00000.flipped.npy         the same of the horizontally flipped images (with --flip)
    OUT/train-00000.labels.npy          int64 [n]

Every file is written to a temporary name and renamed, so a file that exists is complete; a shard whose
files are all present with the shapes the manifest gives is done, which is how a killed extraction
continues. ``resolve_latents_config`` fills a config's ``latents`` keys from the manifest and refuses
one that contradicts it.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .errors import DatasetError

FORMAT = "fastsemdiff-latents-v1"
MANIFEST = "manifest.json"
KINDS = ("latents", "flipped", "labels")


def shard_file(folder: Union[str, Path], split: str, index: int, kind: str) -> Path:
    return Path(folder) / f"{split}-{index:05d}.{kind}.npy"


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard of a split of ``count`` items."""
    return [(lo, min(lo + shard_size, count)) for lo in range(0, count, shard_size)]


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary file and a rename: the file is whole or absent."""
    _atomic(Path(path), lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def write_manifest(folder: Union[str, Path], manifest: dict[str, Any]) -> None:
    _atomic(Path(folder) / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=2) + "\n").encode()))


def read_manifest(folder: Union[str, Path], complete: bool = True) -> dict[str, Any]:
    """The manifest of a latents folder; with ``complete``, an error unless its extraction finished."""
    root = Path(folder)
    fix = "extract the latents first: python -m fastsemdiff.latents --vae VAE_DIR --out FOLDER [data keys]"
    if not root.is_dir():
        raise DatasetError(f"latents folder {str(root)!r} does not exist; point data.path at the folder "
                           f"python -m fastsemdiff.latents wrote, or {fix}")
    path = root / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{root} has no {MANIFEST}, so it holds no extracted latents; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); delete it and run the extraction again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a fastsemdiff latents manifest (format {FORMAT}); {fix}")
    if complete and not manifest.get("complete"):
        raise DatasetError(f"the extraction into {root} did not finish; run its command again to continue it "
                           f"(finished shards are kept): {manifest.get('command', fix)}")
    return manifest


def latent_shape(manifest: dict[str, Any]) -> tuple[int, int, int]:
    lat = manifest["latent"]
    return (int(lat["channels"]), int(lat["size"]), int(lat["size"]))


def image_shape(manifest: dict[str, Any]) -> tuple[int, int, int]:
    img = manifest["image"]
    return (int(img["channels"]), int(img["size"]), int(img["size"]))


def shard_is_complete(folder: Path, split: str, index: int, count: int, shape: tuple[int, ...], flipped: bool
                      ) -> bool:
    """True when every file of the shard exists and has the expected shape and dtype (a rename is atomic,
    so this also holds for a shard written just before a kill)."""
    try:
        _open_shard(folder, split, index, count, shape, flipped)
        return True
    except DatasetError:
        return False


def _open_shard(folder: Path, split: str, index: int, count: int, shape: tuple[int, ...], flipped: bool,
                hint: str = "") -> dict[str, np.ndarray]:
    arrays = {}
    for kind in KINDS if flipped else ("latents", "labels"):
        path = shard_file(folder, split, index, kind)
        want_shape, want_dtype = ((count,), np.int64) if kind == "labels" else ((count, *shape), np.float16)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DatasetError(f"shard file {path} is missing{hint}") from None
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(f"shard file {path} is truncated or damaged ({e}){hint}") from None
        if arr.shape != want_shape or arr.dtype != want_dtype:
            raise DatasetError(f"shard file {path} holds {arr.dtype} {list(arr.shape)} where the manifest needs "
                               f"{np.dtype(want_dtype).name} {list(want_shape)}{hint}")
        arrays[kind] = arr
    return arrays


class LatentShards:
    """One split's shards, memory-mapped and checked against the manifest; rows gathered by global index."""

    def __init__(self, folder: Union[str, Path], split: str = "train", manifest: Optional[dict] = None):
        self.folder = Path(folder)
        self.manifest = manifest or read_manifest(self.folder)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DatasetError(f"{self.folder} holds latents of the {', '.join(splits)} split(s), not {split}; "
                               f"extract it with --splits {split}")
        info = splits[split]
        self.split, self.shape, self.flipped = split, latent_shape(self.manifest), bool(self.manifest["flipped"])
        hint = (f"; run the extraction again to re-encode missing or damaged shards (finished ones are kept): "
                f"{self.manifest.get('command', 'python -m fastsemdiff.latents ...')}")
        counts = [hi - lo for lo, hi in shard_ranges(int(info["count"]), int(self.manifest["shard_size"]))]
        self.shards = [_open_shard(self.folder, split, k, n, self.shape, self.flipped, hint)
                       for k, n in enumerate(counts)]
        self.offsets = np.cumsum([0] + counts)
        self.labels = np.concatenate([s["labels"] for s in self.shards]) if self.shards else np.zeros(0, np.int64)
        if len(self.labels) == 0:
            raise DatasetError(f"{self.folder} holds no latents for the {split} split")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of the latents (and flipped copies) as stored."""
        return len(self) * math.prod(self.shape) * 2 * (2 if self.flipped else 1)

    def rows(self, index: np.ndarray, flips: Optional[np.ndarray] = None) -> np.ndarray:
        """float16 [len(index), c, h, w]: the latents at these global indices (the flipped copy where
        ``flips`` is true), read from the memory-mapped shards in index order within each shard."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), *self.shape), dtype=np.float16)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == s)
            local = index[pick] - self.offsets[s]
            if flips is None:
                out[pick] = _gather(self.shards[s]["latents"], local)
                continue
            f = np.asarray(flips, dtype=bool)[pick]
            for kind, which in (("latents", ~f), ("flipped", f)):
                if which.any():
                    out[pick[which]] = _gather(self.shards[s][kind], local[which])
        return out

    def all_latents(self, flipped: bool = False) -> np.ndarray:
        """Every latent of the split in order, float16 [N, c, h, w], read into memory."""
        return np.concatenate([np.asarray(s["flipped" if flipped else "latents"]) for s in self.shards])


def _gather(array: np.ndarray, local: np.ndarray) -> np.ndarray:
    """array[local] reading the memory map in ascending order (sequential pages), returned in ``local``'s order."""
    order = np.argsort(local, kind="stable")
    rows = np.empty((len(local), *array.shape[1:]), dtype=array.dtype)
    rows[order] = array[local[order]]
    return rows


def resolve_latents_config(cfg):
    """A copy of ``cfg`` whose ``latents`` keys (VAE, hash, scaling, shift, shape) and ``data.image_size`` /
    ``data.channels`` (the images the VAE saw) come from the manifest at ``data.path``; unchanged for other
    sources. A ``latents`` key already set to something else, or flips asked for without flipped copies,
    is an error naming the fix."""
    if cfg.data.source != "latents":
        return cfg
    m = read_manifest(cfg.data.path)
    cfg = copy.deepcopy(cfg)
    lc, d, vae = cfg.latents, cfg.data, m["vae"]
    where = f"the latents in {d.path}"
    again = f"or extract latents for it: python -m fastsemdiff.latents --vae VAE_DIR --out NEW_FOLDER"
    if lc.vae_hash and lc.vae_hash != vae["hash"]:
        raise DatasetError(f"{where} were encoded with another VAE ({vae['path']}, hash {vae['hash'][:12]}) than "
                           f"latents.vae_hash={lc.vae_hash[:12]}; point data.path at latents of that VAE, {again}")
    if lc.vae:
        from ..vae import vae_hash  # hashing needs only the files, not diffusers

        found = vae_hash(lc.vae)
        if found != vae["hash"]:
            raise DatasetError(f"{where} were encoded with the VAE at {vae['path']} (hash {vae['hash'][:12]}), not "
                               f"latents.vae={lc.vae} (hash {found[:12]}); set latents.vae={vae['path']} or leave it "
                               f"empty, {again}")
    for key in ("scaling_factor", "shift_factor"):
        want, have = getattr(lc, key), float(vae[key])
        if want is not None and not math.isclose(want, have, rel_tol=1e-6, abs_tol=1e-9):
            raise DatasetError(f"{where} are scaled with {key}={have:g}, not latents.{key}={want:g}; set "
                               f"latents.{key}={have:g} (or leave it unset), or extract again with "
                               f"--{key.replace('_', '-')} {want:g}")
    c, s, _ = latent_shape(m)
    if (lc.channels and lc.channels != c) or (lc.size and lc.size != s):
        raise DatasetError(f"{where} are {c}x{s}x{s}, but latents.channels={lc.channels} latents.size={lc.size}; "
                           f"set latents.channels={c} latents.size={s} (or 0 to take the manifest's), or point "
                           f"data.path at latents of the shape you want")
    if d.hflip and not m["flipped"]:
        raise DatasetError(f"data.hflip=true needs flipped copies, and {where} have none; set data.hflip=false, "
                           f"or extract again with --flip (as LightningDiT precomputes them)")
    lc.vae = lc.vae or vae["path"]
    lc.vae_hash, lc.scaling_factor, lc.shift_factor = vae["hash"], float(vae["scaling_factor"]), float(vae["shift_factor"])
    lc.channels, lc.size = c, s
    d.channels, d.image_size = image_shape(m)[:2]
    return cfg.validate()
