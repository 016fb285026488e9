"""Encode a dataset once into the latents of a pretrained VAE, for training at DiT scale on them.

    python -m fastsemdiff.latents --vae VAE_DIR --out OUT_DIR [--flip] [--splits train,test] [--batch-size 64]
                                  [--shard-size 4096] [--threads N] [--config F.yaml] [data.source=... ...]
    torchrun --nproc_per_node N -m fastsemdiff.latents ...     # each rank encodes its share of the shards

Any ``data.source`` can be encoded (Fashion-MNIST, .npz arrays, an image folder read with PIL in
``data.workers`` DataLoader workers, centre-cropped to ``data.image_size``). The diffusers AutoencoderKL is
loaded from the local folder (nothing is fetched) and run in batches, in bf16 on a GPU. OUT_DIR receives
fp16 shards of the scaled posterior means, ``(mean - shift_factor) * scaling_factor``, with their labels
(and, with ``--flip``, the latents of the horizontally flipped images, as LightningDiT precomputes them)
and ``manifest.json`` (``fastsemdiff.data.latent_store``). Every file is written atomically; running the
same command again after a kill keeps the finished shards and encodes only the rest. Train on the result
with ``data.source=latents data.path=OUT_DIR``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed
from .config import ConfigError, load_config
from .data import DatasetError, check_images, load_split
from .data.augment import load_image
from .data.device_dataset import images_to_model_range
from .data.latent_store import (FORMAT, read_manifest, save_array, shard_file, shard_is_complete, shard_ranges,
                                write_manifest)
from .data.splits import split_path
from .vae import check_vae_folder, load_vae, vae_factors, vae_hash

FP16_MAX = 65504.0
# Manifest entries that must agree for a rerun to continue an extraction rather than mix two of them.
IDENTITY = ("format", "vae", "latent", "image", "flipped", "shard_size", "splits")


class ImageSource:
    """One split of a data source as an ordered sequence of (uint8 [C, S, S] image, label)."""

    def __init__(self, d, split: str):
        self.d, self.split = d, split
        self.files = None
        if d.source == "folder":
            checked = check_images(split_path(Path(d.path), split), verify=d.verify, bad_images=d.bad_images,
                                   mixed_channels=d.mixed_channels, threads=max(1, d.workers))
            self.files, self.labels = checked.files, torch.tensor(checked.labels, dtype=torch.int64)
            self.skipped = len(checked.skipped)
        else:
            self.images, self.labels = load_split(d.source, d.path, split, d.image_size, d.channels)
            self.skipped = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:  # the folder path, in DataLoader workers
        d = self.d
        pixels = load_image(self.files[i], d.image_size, d.channels, "center", (1.0, 1.0), False,
                            np.random.default_rng(0))
        return torch.from_numpy(pixels), int(self.labels[i])

    def batches(self, batches: list[list[int]], pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) for each list of indices, in order."""
        if self.files is None:
            for idx in batches:
                index = torch.tensor(idx)
                yield self.images[index], self.labels[index]
            return
        loader = torch.utils.data.DataLoader(self, batch_sampler=batches, num_workers=self.d.workers,
                                             pin_memory=pin, prefetch_factor=4 if self.d.workers else None)
        yield from loader


def split_names(d, asked: Optional[Sequence[str]]) -> list[str]:
    """The splits to encode: those asked for, or train and (where the source has one) test."""
    if asked:
        return list(asked)
    try:
        if d.source == "folder":
            split_path(Path(d.path), "test")
        else:
            load_split(d.source, d.path, "test", d.image_size, d.channels)
        return ["train", "test"]
    except DatasetError:
        return ["train"]


class Encoder:
    """Images -> scaled fp16 latents through the VAE, in bf16 autocast on a GPU."""

    def __init__(self, vae, scaling: float, shift: float, device: torch.device):
        self.vae, self.scaling, self.shift, self.device = vae, scaling, shift, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, flip: bool = False) -> np.ndarray:
        x = images_to_model_range(images.to(self.device, non_blocking=True))
        if flip:
            x = x.flip(-1)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            mean = self.vae.encode(x).latent_dist.mean
        z = (mean.float() - self.shift) * self.scaling
        peak = float(z.abs().max())
        if not np.isfinite(peak) or peak > FP16_MAX:
            raise DatasetError(f"scaled latents reach {peak:g}, beyond what float16 stores; lower --scaling-factor "
                               f"(the VAE's is {self.vae.config.scaling_factor})")
        return z.to(torch.float16).cpu().numpy()


def _command(argv: Sequence[str]) -> str:
    launcher = "torchrun --nproc_per_node N -m fastsemdiff.latents" if "RANK" in os.environ else \
        "python -m fastsemdiff.latents"
    return f"{launcher} {shlex.join(argv)}"


def plan_manifest(args, d, vae, scaling: float, shift: float, sources: dict, device: torch.device, argv) -> dict:
    with torch.no_grad():  # the latent shape, from one blank image (the VAE decides its downsampling)
        probe = torch.zeros(1, d.channels, d.image_size, d.image_size, device=device)
        shape = tuple(vae.encode(probe).latent_dist.mean.shape[1:])
    if shape[1] != shape[2]:
        raise DatasetError(f"the VAE turns {d.image_size}x{d.image_size} images into non-square latents {shape}")
    image = {"channels": d.channels, "size": d.image_size, "source": d.source,
             "path": str(Path(d.path).resolve()), "crop": "center"}
    return {
        "format": FORMAT,
        "complete": False,
        "vae": {"path": str(check_vae_folder(args.vae)), "hash": vae_hash(args.vae), "class": "AutoencoderKL",
                "scaling_factor": scaling, "shift_factor": shift},
        "latent": {"channels": int(shape[0]), "size": int(shape[1]), "dtype": "float16",
                   "value": "(posterior mean - shift_factor) * scaling_factor"},
        "image": image,
        "flipped": bool(args.flip),
        "shard_size": args.shard_size,
        "splits": {s: {"count": len(src), "classes": int(src.labels.max()) + 1 if len(src) else 0,
                       "skipped_images": src.skipped} for s, src in sources.items()},
        "command": _command(argv),
    }


def agree_on_plan(out: Path, plan: dict) -> None:
    """Write the plan, or check that a folder's earlier (perhaps unfinished) extraction is this one."""
    if not (out / "manifest.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, plan)
        return
    old = read_manifest(out, complete=False)
    diffs = [k for k in IDENTITY if old.get(k) != plan[k]]
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)} there, {plan[k]} now" for k in diffs)
        raise DatasetError(f"{out} already holds latents of another extraction ({detail}); choose another --out, "
                           f"or delete {out} to start over")
    for stale in out.glob(".*.tmp*"):  # half-written files of a killed run: never renamed, never used
        stale.unlink(missing_ok=True)
    write_manifest(out, {**old, "command": plan["command"]})


def encode_split(out: Path, split: str, src: ImageSource, encoder: Encoder, plan: dict, batch_size: int,
                 rank: int, world: int, progress: bool) -> int:
    """Encode this rank's unfinished shards of one split (shard k belongs to rank k mod world); returns how many."""
    shape = (plan["latent"]["channels"], plan["latent"]["size"], plan["latent"]["size"])
    ranges = shard_ranges(len(src), plan["shard_size"])
    todo = [k for k in range(rank, len(ranges), world)
            if not shard_is_complete(out, split, k, ranges[k][1] - ranges[k][0], shape, plan["flipped"])]
    batches, owner = [], []
    for k in todo:
        lo, hi = ranges[k]
        for b in range(lo, hi, batch_size):
            batches.append(list(range(b, min(b + batch_size, hi))))
            owner.append(k)
    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    bar = tqdm(total=total, desc=f"{split} latents" + (f" (rank {rank}/{world})" if world > 1 else ""),
               unit="img", disable=not progress, dynamic_ncols=True)
    parts: dict[str, list] = {"latents": [], "flipped": [], "labels": []}
    for i, (images, labels) in enumerate(src.batches(batches, pin=encoder.device.type == "cuda")):
        parts["latents"].append(encoder(images))
        if plan["flipped"]:
            parts["flipped"].append(encoder(images, flip=True))
        parts["labels"].append(labels.numpy().astype(np.int64))
        bar.update(len(labels))
        if i + 1 == len(batches) or owner[i + 1] != owner[i]:  # the shard is whole: write it, labels last
            for kind in ("latents", "flipped", "labels"):
                if parts[kind]:
                    save_array(shard_file(out, split, owner[i], kind), np.concatenate(parts[kind]))
            parts = {kind: [] for kind in parts}
    bar.close()
    return len(todo)


def _splits(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    if not names or any(s not in ("train", "test") for s in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give train, test or train,test")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastsemdiff.latents", description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="folder of a diffusers AutoencoderKL (save_pretrained layout)")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--config", help="YAML whose data section says what to encode (key=value overrides win)")
    p.add_argument("--splits", type=_splits, default=None,
                   help="train, test or train,test (default: train, and test where the source has one)")
    p.add_argument("--flip", action="store_true", help="also store the latents of the flipped images")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.add_argument("--scaling-factor", type=float, default=None, help="default: the VAE config's")
    p.add_argument("--shift-factor", type=float, default=None, help="default: the VAE config's (0 if none)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when there is a GPU, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="data keys, e.g. data.source=folder data.path=DIR data.image_size=256")
    return p


def extract(argv: Sequence[str]) -> Path:
    args = build_parser().parse_args(argv)
    bad = [o for o in args.overrides if not o.split("=", 1)[0].startswith("data.")]
    if bad:
        raise ConfigError(f"{' '.join(bad)}: only data.* keys choose what is encoded (e.g. data.source=npz "
                          f"data.path=FILE.npz)")
    if args.batch_size < 1 or args.shard_size < 1:
        raise ConfigError("--batch-size and --shard-size must be positive")
    d = load_config(args.config, args.overrides).data
    if d.source == "latents":
        raise ConfigError("data.source=latents is already encoded; point data.source and data.path at images")
    check_vae_folder(args.vae)  # before anything slow
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if world > 1 and not dist.is_initialized():
        distributed.init_process_group("gloo")  # only barriers: the shards are files
    if device.type == "cpu" and (args.threads or world > 1):
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    out = Path(args.out)
    start = time.perf_counter()

    vae = load_vae(args.vae, device)
    scaling, shift = vae_factors(vae)
    scaling = args.scaling_factor if args.scaling_factor is not None else scaling
    shift = args.shift_factor if args.shift_factor is not None else shift
    sources = {s: ImageSource(d, s) for s in split_names(d, args.splits)}
    plan = plan_manifest(args, d, vae, scaling, shift, sources, device, argv)
    _on_rank0(lambda: agree_on_plan(out, plan), rank)
    encoder = Encoder(vae, scaling, shift, device)
    done = {s: encode_split(out, s, src, encoder, plan, args.batch_size, rank, world,
                            rank == 0 and not args.no_progress) for s, src in sources.items()}
    _barrier()

    def finish() -> None:
        shape = (plan["latent"]["channels"], plan["latent"]["size"], plan["latent"]["size"])
        for s, src in sources.items():
            for k, (lo, hi) in enumerate(shard_ranges(len(src), plan["shard_size"])):
                if not shard_is_complete(out, s, k, hi - lo, shape, plan["flipped"]):
                    raise DatasetError(f"shard {k} of {s} is missing after the extraction; run it again")
        write_manifest(out, {**read_manifest(out, complete=False), "complete": True})
        counts = ", ".join(f"{s} {len(src)} ({done[s]} shard(s) encoded now)" for s, src in sources.items())
        print(f"fastsemdiff.latents: wrote {out}: {counts}; latents {shape[0]}x{shape[1]}x{shape[2]} fp16"
              f"{' with flipped copies' if args.flip else ''}, scaling {scaling:g}, shift {shift:g} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)

    _on_rank0(finish, rank)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _on_rank0(work, rank: int) -> None:
    """Run ``work`` on rank 0 only; every rank raises its error, so none waits at a barrier for a failed one."""
    error = None
    if rank == 0:
        try:
            work()
        except (ConfigError, DatasetError) as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise DatasetError(error)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    distributed.run_command("fastsemdiff.latents", lambda: extract(argv), (ConfigError, DatasetError))


if __name__ == "__main__":
    main()
    distributed.exit_if_gloo_outlives_the_group()
