"""Sharded, resumable training checkpoints with torch.distributed.checkpoint (DCP).

Each checkpoint is a folder ``checkpoints/step_NNNNNNN`` written first under a temporary name and
renamed once every rank has finished, so an interrupted save never replaces a good checkpoint. With
``AsyncCheckpointer`` the files are written in the background and the rename waits for them.
DCP's stock reader unpickles its metadata and non-tensor items; the reader and planner here only
accept DCP's own metadata classes and load items with ``weights_only=True``.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import json
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .config import Config
from .errors import CheckpointError

META_FILE = "meta.json"
# Config keys that change parameter shapes or meaning: a checkpoint only resumes into the same values.
ARCH_KEYS = ("model.preset", "model.patch_size", "model.hidden_size", "model.depth", "model.num_heads",
             "model.mlp_ratio", "model.qk_norm", "model.cond_merge", "encoder.time_conditioned", "encoder.depth",
             "encoder.dim", "encoder.regularizer", "data.image_size", "data.channels")


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
    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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


_ADVICE = "delete that folder to resume from the previous checkpoint, or start a new train.run_dir"


def _reason(e: BaseException) -> str:
    """One short line for an exception, unwrapping DCP's per-rank CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
        return "UnpicklingError: an item is damaged, or holds pickled objects other than tensors, which are refused"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _get(d: dict, dotted: str):
    section, key = dotted.split(".")
    return d.get(section, {}).get(key)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {META_FILE} (corrupt or incomplete): {e}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("config"), dict)):
        raise CheckpointError(f"checkpoint {path} has a corrupt {META_FILE}: it needs an integer 'step' and a "
                              "'config' mapping")
    return meta


def check_compatible(meta: dict[str, Any], cfg: Config, path: Path) -> None:
    now = cfg.to_dict()
    diffs = [f"{k}: checkpoint {_get(meta['config'], k)!r} vs now {_get(now, k)!r}"
             for k in ARCH_KEYS if _get(meta["config"], k) != _get(now, k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is from a different model config ({'; '.join(diffs)}); resume with the "
            "run's own config.yaml, or start a new run_dir"
        )


def load_checkpoint(path: Path, model, optimizer, ema: dict[str, torch.Tensor], cfg: Config) -> int:
    """Collective: restore model, optimizer and EMA in place from ``path``; returns the step."""
    meta = read_meta(path)
    check_compatible(meta, cfg, path)
    reader = SafeReader(str(path))
    # Read the metadata once here: DCP itself retries a failed read and logs each failure's traceback on
    # the root logger, so a corrupt file would bury the one-line error under tracebacks.
    try:
        reader.read_metadata()
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: its .metadata cannot be read ({_reason(e)}); "
                              f"{_ADVICE}") from None
    state = _state(model, optimizer, ema)
    try:
        dcp.load(state, storage_reader=reader, planner=SafePlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException (per-rank failures) is a BaseException
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete and cannot be read ({_reason(e)}); "
                              f"{_ADVICE}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(meta["step"])
