"""The trained model as one ``model.safetensors`` with its config in the file's metadata.

safetensors holds only tensors, so loading an exported model never unpickles anything. Files written
before ``model.pos_layout`` existed have neither that key nor ``pos_embed`` entries: they load with their
own (rows-first) positions, rebuilt from the config, and embed exactly as before.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Config, ConfigError, from_saved_dict
from .errors import CheckpointError

FORMAT = "fastsemdiff-v1"
MODEL_FILE = "model.safetensors"


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_weights(state_dict: dict[str, torch.Tensor], cfg: Config, path: Union[str, Path]) -> Path:
    """Save float32 CPU copies of ``state_dict`` and the config (in the metadata and as config.json beside)."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    meta = {"format": FORMAT, "config": cfg.to_json()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    atomic_write(path.with_name("config.json"), lambda tmp: tmp.write_text(cfg.to_json() + "\n"))
    return path


def save_model(model: torch.nn.Module, cfg: Config, path: Union[str, Path]) -> Path:
    return save_weights(model.state_dict(), cfg, path)


def resolve_model_path(path: Union[str, Path]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise CheckpointError(
            f"no exported model at {p}: train first (python -m fastsemdiff.train), or point at a run "
            f"directory that holds {MODEL_FILE}"
        )
    return p


def read_exported(path: Union[str, Path]) -> tuple[Config, dict[str, torch.Tensor]]:
    p = resolve_model_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{p} is a safetensors file but not a fastsemdiff model (no config in its metadata)")
    try:
        cfg = from_saved_dict(json.loads(meta["config"])).validate()
    except (ConfigError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} holds a config this version cannot read: {e}") from None
    return cfg, tensors


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with the mismatch explained in terms of configs, not tensor names. Weights in the
    other adaLN layout (stacked or per block: FSDP runs train per block) are converted first."""
    from .nn import BlockStack, convert_adaln_state_dict

    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, BlockStack):
            convert_adaln_state_dict(state, f"{name}." if name else "", len(module.blocks),
                                     "stacked" if module.adaLN_stack is not None else "per_block")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)) if keys
        )
        raise CheckpointError(f"{source} was saved from a different model config ({detail})")
    model.load_state_dict(state)


def with_fixed_positions(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the model's own sin-cos tables for the ``pos_embed`` entries it lacks (files saved
    before they were stored): the table is fixed by the config, whose ``model.pos_layout`` says which."""
    own = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] == "pos_embed" and k not in state}
    return {**state, **own}


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None):
    """Build the model from the exported config, load its weights, eval mode, on ``device`` (best by default)."""
    from .models import SemanticDiffusion

    cfg, tensors = read_exported(path)
    model = SemanticDiffusion(cfg)
    tensors = with_fixed_positions(model, tensors)
    load_state_strict(model, tensors, str(resolve_model_path(path)))
    model.readout = read_readout(resolve_model_path(path).parent)
    return model.to(device or best_device()).eval()


READOUT_FILE = "readout.json"


def write_readout(folder: Union[str, Path], readout: dict) -> Path:
    """Record beside the model which readout the probe found best ({"t": ...} or {"ts": [...]}), so that
    ``fastsemdiff.load(run).embed(images)`` with no t returns it."""
    path = Path(folder) / READOUT_FILE
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(readout, indent=2) + "\n"))
    return path


def read_readout(folder: Union[str, Path]) -> Optional[dict]:
    path = Path(folder) / READOUT_FILE
    if not path.is_file():
        return None
    try:
        readout = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); delete it or run the probe again") from None
    if not isinstance(readout, dict) or not ("t" in readout or "ts" in readout):
        raise CheckpointError(f"{path} names no readout (a 't' or 'ts' key); delete it or run the probe again")
    return readout
