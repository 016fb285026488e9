"""Sharded, resumable training checkpoints with torch.distributed.checkpoint (DCP).

Each checkpoint is a folder ``checkpoints/step_NNNNNNN`` written first under a temporary name and
renamed once every rank has finished, so an interrupted save never replaces a good checkpoint. With
``AsyncCheckpointer`` the files are written in the background and the rename waits for them.
DCP's stock reader unpickles its metadata and non-tensor items; the reader and planner here only
accept DCP's own metadata classes and load items with ``weights_only=True``.

Resuming (``resume_latest``) refuses a config that changes the parameters or the objective
(``FIXED_ON_RESUME``), converts a changed adaLN layout, fills the fixed positions of checkpoints that
predate them, and falls back to the previous checkpoint when the latest is corrupt.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import json
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import Config, ConfigError, from_saved_dict
from .errors import CheckpointError
from .export import atomic_write

META_FILE = "meta.json"
METADATA_FILE = ".metadata"  # DCP's global metadata file, written by the coordinator rank of a save
# Keys whose change alters the parameters or the objective: a checkpoint resumes only with the same values.
# Sizes are compared as resolved (a preset and the same sizes spelled out are the same model).
FIXED_ON_RESUME = (
    "model.hidden_size", "model.depth", "model.num_heads", "model.patch_size", "model.mlp_ratio", "model.qk_norm",
    "model.cond_merge", "model.z_dropout", "model.token_mask", "model.mask_loss_weight", "model.rms_norm",
    "model.pos_layout",
    "encoder.arch", "encoder.conv_channels", "encoder.conv_strides", "encoder.conv_residual_blocks",
    "encoder.conv_film_from", "encoder.pool_grid",
    "encoder.input", "encoder.view_shift", "encoder.view_flip",
    "encoder.view_crop_scale", "encoder.view_erase", "encoder.invariance_weight", "encoder.time_conditioned",
    "encoder.t_bins", "encoder.normalize",
    "encoder.depth", "encoder.dim",
    "encoder.regularizer", "encoder.reg_weight", "encoder.kl_variance", "encoder.objective", "encoder.num_classes",
    "diffusion.schedule", "diffusion.prediction", "diffusion.lambda_cons", "diffusion.cons_step",
    "diffusion.t_sampling", "diffusion.t_mean", "diffusion.t_std", "diffusion.t_shift", "diffusion.loss_weight",
    "diffusion.min_snr_gamma",
    "data.image_size", "data.channels",
    # data.source=latents: the latent space itself (another VAE or scaling gives same-shaped latents that
    # mean something else); pixel runs hold the defaults on both sides
    "latents.channels", "latents.size", "latents.vae_hash", "latents.scaling_factor", "latents.shift_factor",
)
# Keys free to change on resume: how the same model is computed (backend; the adaLN layout is converted on
# load), where the same data comes from and how it is read, and every train.* / eval.* key (length, learning
# rate schedule, logging, checkpoint cadence, run_dir). model.preset's sizes are compared instead.
FREE_ON_RESUME = ("model.preset", "model.backend", "model.fused_check", "model.adaln", "data.source",
                  "data.path", "data.hflip", "data.loader", "data.workers", "data.crop", "data.crop_scale", "data.bad_images",
                  "data.mixed_channels", "data.verify", "latents.vae", "latents.resident")
FREE_ON_RESUME += ("model.attention", "model.mlp_epilogue")  # speed switches: which kernels, the same weights
FREE_SECTIONS_ON_RESUME = ("train", "eval")


class CorruptCheckpoint(CheckpointError):
    """A checkpoint folder whose files cannot be read (as opposed to one of another config)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: its dataclasses, torch sizes/dtypes and plain containers."""

    _builtins = {"set", "frozenset", "dict", "list", "tuple", "int", "float", "str", "bytes", "bool", "slice"}
    _allowed = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in self._builtins:
            return super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint") and "." not in name:
            # Only DCP's own data classes: not any attribute of its modules (e.g. the ``os`` they import,
            # reachable through a dotted name), nor functions or classes with side effects.
            obj = getattr(sys.modules.get(module), name, None)
            if (isinstance(obj, type) and obj.__module__.startswith("torch.distributed.checkpoint")
                    and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))):
                return obj
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeReader(FileSystemReader):
    """DCP's file-system reader, with the metadata file unpickled by ``_MetadataUnpickler``."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self.checkpoint_folder = Path(path)

    def read_metadata(self, *args: Any, **kwargs: Any):
        with open(self.checkpoint_folder / METADATA_FILE, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """Loads a flat state dict (keys are DCP's dotted names, see ``_slots``), reading non-tensor items with
    ``weights_only=True``: only plain values and tensors, never pickled objects."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _data_state_name(rank: int, world_size: int) -> str:
    return f"data_rank{rank:04d}_of{world_size:04d}.bin"


def load_data_state(path: Path, rank: int, world_size: int) -> Optional[bytes]:
    """This rank's saved data-stream state, or None when the checkpoint has none for this world size.

    A stream saved with another number of processes read other shards, so it cannot be continued:
    the stream then starts afresh (with a warning), while weights and optimizer still resume.
    """
    file = Path(path) / _data_state_name(rank, world_size)
    if file.is_file():
        return file.read_bytes()
    if rank == 0 and any(Path(path).glob("data_rank*.bin")):
        warnings.warn(f"{path} holds data-stream states for another number of processes; the image stream starts "
                      f"a new pass instead of continuing where it stopped", stacklevel=2)
    return None


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / META_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def adaln_layout(path: Path) -> Optional[str]:
    """The adaLN layout of a checkpoint's model ("stacked" or "per_block", None if it holds neither), read
    from its DCP metadata: a resumed run keeps the layout it was started with, whatever the parallelism."""
    keys = SafeReader(str(path)).read_metadata().state_dict_metadata
    if any("adaLN_stack." in k for k in keys):
        return "stacked"
    if any("blocks.0.adaLN_modulation." in k for k in keys):
        return "per_block"
    return None


def _state(model, optimizer, ema: dict[str, torch.Tensor]) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "ema": ema}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, ema: dict[str, torch.Tensor], cfg: Config,
                    keep_last: int, data_state: Optional[bytes] = None) -> Path:
    """Collective: every rank calls it. Returns the final folder.

    ``data_state`` is this rank's data-stream state (DALI's reader checkpoint); it is written into the
    same temporary folder, so it appears with the weights or not at all.
    """
    pending = _begin_save(run_dir, step, _state(model, optimizer, ema), data_state)
    with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(pending.state, checkpoint_id=str(pending.tmp))
    return pending.finish(cfg, keep_last)


@dataclasses.dataclass
class _PendingSave:
    """A checkpoint being written into ``tmp``; ``finish`` makes it visible under ``final``."""

    step: int
    tmp: Path
    final: Path
    run_dir: Path
    state: Any = None
    future: Any = None  # DCP async_save's future, or None for a synchronous save

    def finish(self, cfg: Config, keep_last: int) -> Path:
        """Collective. Waits for this rank's writes, then (once every rank is done) adds ``meta.json`` and
        renames the folder: the one step that makes a checkpoint complete."""
        if self.future is not None:
            self.future.result()
        _barrier()
        if _rank() == 0:
            (self.tmp / META_FILE).write_text(json.dumps({"step": self.step, "config": cfg.to_dict()}, indent=2))
            shutil.rmtree(self.final, ignore_errors=True)
            self.tmp.rename(self.final)
            for old in list_checkpoints(self.run_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return self.final


def _begin_save(run_dir: Path, step: int, state: dict[str, Any], data_state: Optional[bytes]) -> _PendingSave:
    root = checkpoint_dir(run_dir)
    pending = _PendingSave(step, root / f".tmp_step_{step:07d}", root / f"step_{step:07d}", Path(run_dir), state)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(pending.tmp, ignore_errors=True)
    _barrier()
    if data_state is not None:
        pending.tmp.mkdir(parents=True, exist_ok=True)
        (pending.tmp / _data_state_name(_rank(), _world_size())).write_bytes(data_state)
    return pending


class AsyncCheckpointer:
    """Checkpoints written in the background (DCP ``async_save``): the state is copied to host memory
    during the call, the files are written by a thread while training goes on, and ``finish`` (at the
    next log step, the next save or the end) waits for the writes and renames the folder. Until then the
    checkpoint is a temporary folder, so a run killed while writing keeps its previous good checkpoint.
The trainer completes a save at the first log step where every rank has written its part, and always
before the next save and at the end.
    The writer's collectives use a gloo group of their own, never the training group's.
    """

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.pending: Optional[_PendingSave] = None

    def save(self, run_dir: Path, step: int, model, optimizer, ema: dict[str, torch.Tensor], cfg: Config,
             keep_last: int, data_state: Optional[bytes] = None) -> None:
        self.finish(cfg, keep_last)
        pending = _begin_save(run_dir, step, _state(model, optimizer, ema), data_state)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            pending.future = dcp.async_save(pending.state, checkpoint_id=str(pending.tmp), process_group=self.group)
        pending.state = None  # async_save has its own host copy
        self.pending = pending

    def writing(self) -> bool:
        """Whether this rank's part of the save in flight is still being written."""
        return self.pending is not None and not self.pending.future.done()

    def finish(self, cfg: Config, keep_last: int) -> Optional[Path]:
        """Collective. Completes the save in flight, if any (waiting for its writes); returns its folder."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        return pending.finish(cfg, keep_last)


def _reason(e: BaseException) -> str:
    """One short line for an exception, unwrapping DCP's per-rank CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
        return "UnpicklingError: an item is damaged, or holds pickled objects other than tensors, which are refused"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {META_FILE} (corrupt or incomplete): {e}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("config"), dict)):
        raise CheckpointError(f"checkpoint {path} has a corrupt {META_FILE}: it needs an integer 'step' and a "
                              "'config' mapping")
    return meta


def _resume_values(cfg: Config) -> dict[str, Any]:
    """The ``FIXED_ON_RESUME`` values of a config, sizes resolved from the preset."""
    d = cfg.to_dict()
    values = {k: d[k.split(".")[0]][k.split(".")[1]] for k in FIXED_ON_RESUME}
    hidden, depth, heads = cfg.model.resolved()
    values.update({"model.hidden_size": hidden, "model.depth": depth, "model.num_heads": heads,
                   "encoder.depth": cfg.encoder.depth or max(1, depth // 2)})
    return values


def _as_override(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def saved_config(meta: dict[str, Any], path: Path) -> Config:
    """The config a checkpoint was written with (keys it predates take their legacy values)."""
    try:
        return from_saved_dict(meta["config"]).validate()
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot read: {e}") from None


def check_compatible(meta: dict[str, Any], cfg: Config, path: Path) -> Config:
    """Refuse to resume with another value of a key that alters the parameters or the objective, naming
    each key with the checkpoint's value and today's. Returns the checkpoint's config."""
    saved = saved_config(meta, path)
    old, now = _resume_values(saved), _resume_values(cfg)
    changed = [k for k in FIXED_ON_RESUME if old[k] != now[k]]
    if changed:
        diffs = "; ".join(f"{k}: checkpoint {old[k]!r}, now {now[k]!r}" for k in changed)
        keep = " ".join(f"{k}={_as_override(old[k])}" for k in changed)
        raise CheckpointError(
            f"checkpoint {path} is from a different model config or objective ({diffs}); these keys change the "
            f"parameters or the loss, so the run cannot continue with them. Resume with the run's own "
            f"config.yaml or pass {keep}, or start a new train.run_dir"
        )
    return saved


def _slots(state: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(flat name, container, key) of every leaf of a nested state, named as DCP's own flattening names
    them when it saves: mapping keys and list positions joined by dots; a list holding no dicts or tensors
    (such as a param group's ``params``) and anything that is neither dict nor list is one leaf."""
    for key, value in (state.items() if isinstance(state, dict) else enumerate(state)):
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (
                isinstance(value, list) and any(isinstance(v, (dict, list, torch.Tensor)) for v in value)):
            yield from _slots(value, name + ".")
        else:
            yield name, state, key


_STACKED = re.compile(r"^(?P<head>.*?)adaLN_stack\.(?P<kind>weight|bias)(?P<tail>\..+)?$")
_PER_BLOCK = re.compile(r"^(?P<head>.*?)blocks\.(?P<i>\d+)\.adaLN_modulation\.1\.(?P<kind>weight|bias)(?P<tail>\..+)?$")


def _placeholder(md: Any) -> torch.Tensor:
    if not isinstance(md, TensorStorageMetadata):
        raise CheckpointError("a saved adaLN entry is not a tensor")
    return torch.empty(md.size, dtype=md.properties.dtype)


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write a whole (unsharded) tensor into ``target``, which may be a DTensor shard (FSDP2)."""
    if isinstance(target, DTensor):
        local = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(full)


def _adaln_sources(name: str, target: torch.Tensor, saved: dict[str, Any]
                   ) -> Optional[tuple[dict[str, torch.Tensor], Callable[[dict[str, torch.Tensor]], torch.Tensor]]]:
    """For an entry of one adaLN layout that the checkpoint holds in the other: placeholders for the saved
    entries and how to build this one from them (concatenate the blocks' rows, or take block i's rows;
    a scalar such as the optimizer's ``step`` is the same for every block)."""
    m = _STACKED.match(name)
    if m:
        head, kind, tail = m["head"], m["kind"], m["tail"] or ""
        names = []
        while f"{head}blocks.{len(names)}.adaLN_modulation.1.{kind}{tail}" in saved:
            names.append(f"{head}blocks.{len(names)}.adaLN_modulation.1.{kind}{tail}")
        if not names:
            return None
        srcs = {n: _placeholder(saved[n]) for n in names}
        return srcs, lambda got: torch.cat([got[n] for n in names]) if target.dim() else got[names[0]]
    m = _PER_BLOCK.match(name)
    if m:
        src = f"{m['head']}adaLN_stack.{m['kind']}{m['tail'] or ''}"
        if src not in saved:
            return None
        i, rows = int(m["i"]), (target.shape[0] if target.dim() else 0)
        return {src: _placeholder(saved[src])}, lambda got: got[src][i * rows:(i + 1) * rows] if rows else got[src]
    return None


def _plan(flat: dict[str, Any], saved: dict[str, Any], path: Path):
    """What to ask DCP for: the entries the checkpoint holds under the same name, placeholders for those
    it holds in the other adaLN layout (with their conversions), nothing for the fixed positions it
    predates (the model keeps its own) or for the param groups' ``params`` (this optimizer's own names)."""
    request, conversions, missing = {}, [], []
    for name, value in flat.items():
        if name in saved:
            if not (name.startswith("optim.param_groups.") and name.endswith(".params")):
                request[name] = value
        elif name.rsplit(".", 1)[-1] == "pos_embed":
            continue
        elif isinstance(value, torch.Tensor) and (conv := _adaln_sources(name, value, saved)) is not None:
            request.update(conv[0])
            conversions.append((value, conv[0], conv[1]))
        else:
            missing.append(name)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} entries this model needs "
                              f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}): it was written "
                              "by another model or version; start a new train.run_dir")
    return request, conversions


def load_checkpoint(path: Path, model, optimizer, ema: dict[str, torch.Tensor], cfg: Config) -> int:
    """Collective: restore model, optimizer and EMA in place from ``path``; returns the step.

    A checkpoint of the other adaLN layout (``model.adaln``) is converted; one written before the fixed
    positions were stored keeps the model's own (its ``model.pos_layout`` is checked to match).
    Raises ``CorruptCheckpoint`` when the files cannot be read, ``CheckpointError`` for another config.
    """
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        raise CorruptCheckpoint(str(e)) from None
    check_compatible(meta, cfg, path)
    reader = SafeReader(path)
    # Read the metadata once here: DCP itself retries a failed read and logs each failure's traceback on
    # the root logger, so a corrupt file would bury the one-line error under tracebacks.
    try:
        saved = reader.read_metadata().state_dict_metadata
    except Exception as e:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its {METADATA_FILE} cannot be read "
                                f"({_reason(e)})") from None
    state = _state(model, optimizer, ema)
    slots = list(_slots(state))
    request, conversions = _plan({name: box[key] for name, box, key in slots}, saved, path)
    planner = SafePlanner()
    try:
        dcp.load(request, storage_reader=reader, planner=planner)
    except (Exception, CheckpointException) as e:  # CheckpointException (per-rank failures) is a BaseException
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or incomplete and cannot be read "
                                f"({_reason(e)})") from None
    got = planner.state_dict  # non-tensor items arrive as new objects; tensors were loaded in place
    for name, box, key in slots:
        if name in got:
            box[key] = got[name]
    with torch.no_grad():
        for target, sources, build in conversions:
            _copy_full_into(target, build({n: got[n] for n in sources}))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(meta["step"])


def _set_aside(path: Path) -> Path:
    """Move a corrupt checkpoint out of the way (kept for inspection, no longer counted as a checkpoint)."""
    dest = path.with_name(f"corrupt_{path.name}")
    if _rank() == 0:
        shutil.rmtree(dest, ignore_errors=True)
        path.rename(dest)
    _barrier()
    return dest


def resume_latest(run_dir: Path, model, optimizer, ema: dict[str, torch.Tensor], cfg: Config,
                  say: Callable[[str], None] = print) -> tuple[Path, int]:
    """Collective: load the newest checkpoint that reads; returns (its folder, its step).

    A corrupt checkpoint is reported and the one before it tried; once one loads, the corrupt newer ones
    are moved aside (``checkpoints/corrupt_step_N``, kept for inspection) so they are neither resumed nor
    counted by ``keep_last``. A checkpoint of another config stops at once (``check_compatible``); when
    none reads, nothing is moved and the error lists why each failed.
    """
    found = list_checkpoints(run_dir)
    corrupt: list[Path] = []
    reasons = []
    for i, path in enumerate(reversed(found)):
        try:
            step = load_checkpoint(path, model, optimizer, ema, cfg)
        except CorruptCheckpoint as e:
            corrupt.append(path)
            reasons.append(str(e))
            nxt = found[-i - 2].name if i + 2 <= len(found) else None
            say(f"{e}" + (f"; resuming from {nxt} instead" if nxt else ""))
            continue
        _barrier()
        for bad in corrupt:
            say(f"moved the corrupt {bad.name} to {_set_aside(bad)}")
        return path, step
    raise CheckpointError(f"no checkpoint of {run_dir} can be read ({' | '.join(reasons) or 'none found'}); "
                          "start a new train.run_dir")


def drop_metrics_after(path: Path, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (the checkpoint a run resumes from), so the
    resumed run logs each later step once; a line cut short by a kill is dropped too. Rewritten
    atomically; returns how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            keep = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step
        except json.JSONDecodeError:
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))
    return dropped
