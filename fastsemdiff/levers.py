"""The training step's speed switches: each checked against the device before training starts (a choice the
machine cannot run stops the run with the reason and the fix, never a crash mid-step), then applied.

Switches and their defaults (kept until a measured row says otherwise; ``scripts/gpucheck/stages/switch_matrix.py``
measures each on/off in one run):

* ``model.attention`` (auto): SDPA's own choice per call, or one SDPA backend, or the flash-attn package;
* ``model.mlp_epilogue`` (off): bias + tanh-GELU in fc1's matmul epilogue;
* ``train.update`` (auto): AdamW fused (CUDA and CPU: one kernel per parameter group) or foreach (elsewhere),
  the EMA as one multi-tensor op;
* ``train.compile_mode`` (default): torch.compile's mode; ``reduce-overhead`` (CUDA graphs) is CUDA only;
  ``train.compile=on`` on a CPU needs a working C++ compiler (``check_compile_toolchain``);
* ``train.fp8`` (off): torchao float8 training of the blocks' token matmuls (``fp8_filter``).
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ConfigError
from .nn.attention import SDPA_BACKENDS, flash_attn_func, set_attention_backend, set_mlp_epilogue

# The FP8 module filter's rule: an nn.Linear inside a transformer block (``blocks.<i>.``: the per-token matmuls
# qkv, proj, fc1, fc2, with batch x tokens rows) whose in and out features are both multiples of 16 (the FP8
# GEMM's alignment) and at least FP8_MIN_FEATURES. Conditioning linears (one row per image: adaLN, t/z
# embedders) and the final projection (a few outputs) stay in bf16, where FP8's scaling costs more than it saves.
FP8_MIN_FEATURES = 1024
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89), Hopper (sm_90), Blackwell


def fp8_filter(module: nn.Module, fqn: str) -> bool:
    """Whether float8 training converts ``module`` (named ``fqn`` in the model): see ``FP8_MIN_FEATURES``."""
    if not isinstance(module, nn.Linear):
        return False
    in_block = fqn.startswith("blocks.") or ".blocks." in fqn
    return (in_block and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and min(module.in_features, module.out_features) >= FP8_MIN_FEATURES)


def check_attention(choice: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> None:
    """Raise ConfigError unless attention ``choice`` runs forward and backward on ``device`` at this head size and
    compute dtype: a tiny call with only that backend allowed, so the answer is torch's, not a table's."""
    if choice == "auto":
        return
    if choice == "flash_attn":
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"model.attention=flash_attn needs a CUDA GPU and bf16 (train.precision=bf16 or auto on "
                              f"CUDA); this run is {device.type} with {dtype}: use model.attention=auto")
        try:
            fn = flash_attn_func()
        except ImportError as e:
            raise ConfigError(str(e)) from None
        q = torch.randn(1, 16, 1, head_dim, device=device, dtype=dtype, requires_grad=True)
        try:
            fn(q, q, q).sum().backward()
        except RuntimeError as e:
            raise ConfigError(f"model.attention=flash_attn cannot run here at head size {head_dim}: {e}") from None
        return
    q = torch.randn(1, 1, 16, head_dim, device=device, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as why:
        warnings.simplefilter("always")
        try:
            with torch.nn.attention.sdpa_kernel(SDPA_BACKENDS[choice]):
                F.scaled_dot_product_attention(q, q, q).sum().backward()
        except RuntimeError:
            reasons = "; ".join(str(w.message).strip() for w in why if "kernel" in str(w.message).lower()
                                or "attention" in str(w.message).lower())
            raise ConfigError(
                f"model.attention={choice} (SDPA's {SDPA_BACKENDS[choice].name} backend) cannot run on this "
                f"{device.type} device at head size {head_dim} in {str(dtype).replace('torch.', '')}"
                f"{': ' + reasons if reasons else ''}; use model.attention=auto (SDPA chooses)") from None


def check_update(choice: str, device: torch.device) -> None:
    """Raise ConfigError if ``train.update`` asks for fused AdamW on a device torch has no fused kernel for."""
    if choice != "fused":
        return
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
    except RuntimeError as e:
        raise ConfigError(f"train.update=fused: torch has no fused AdamW on {device.type} ({e}); use "
                          "train.update=foreach or auto") from None


def check_compile_mode(cfg: Config, device: torch.device, compiling: bool) -> None:
    """``reduce-overhead`` captures CUDA graphs: refused off CUDA (torch would silently run it without them, so
    the run would not be what was asked) and where nothing is compiled."""
    mode = cfg.train.compile_mode
    if mode == "default":
        return
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"train.compile_mode=reduce-overhead captures the step in CUDA graphs, which need a CUDA "
                          f"device; this run is on {device.type}: use train.compile_mode=default")
    if not compiling:
        raise ConfigError(f"train.compile_mode={mode} needs torch.compile, which is off for this run "
                          f"(train.compile={cfg.train.compile} on {device.type}); set train.compile=on")


@functools.lru_cache(maxsize=None)
def cpu_compile_error() -> Optional[str]:
    """Why torch.compile cannot build CPU code here (its first line), or None: a two-op function compiled once
    per process (a few seconds)."""
    try:
        torch.compile(lambda a: a * 2 + 1, dynamic=False)(torch.arange(4.0))
    except Exception as e:  # noqa: BLE001 - inductor raises many kinds; each means the same to the user
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return None


def check_compile_toolchain(device: torch.device, compiling: bool) -> None:
    """torch.compile on a CPU generates C++ and builds it with the machine's compiler (inductor's cpp
    backend): without one the first step would fail deep inside inductor, after the data and the model were
    built. ``cpu_compile_error`` says so up front, and this names the fix."""
    if not compiling or device.type != "cpu":
        return
    error = cpu_compile_error()
    if error is not None:
        raise ConfigError(f"train.compile=on on a CPU builds the compiled step with a C++ compiler, and torch.compile "
                          f"could not ({error[:300]}); install one (Debian/Ubuntu: apt-get install "
                          "g++, which scripts/setup.sh does when run as root) or set train.compile=off")


def check_fp8(choice: str, device: torch.device) -> None:
    """Raise ConfigError unless float8 training can run: torchao importable, a CUDA GPU of capability 8.9+."""
    if choice == "off":
        return
    if device.type != "cuda":
        raise ConfigError(f"train.fp8={choice} needs FP8 tensor cores: a CUDA GPU of compute capability "
                          f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell); this "
                          f"run is on {device.type}: use train.fp8=off")
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        raise ConfigError(f"train.fp8={choice} needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                          f"Blackwell); {torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}: use train.fp8=off")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"train.fp8={choice} uses torchao's float8 training, which is not installed: "
                          "`pip install torchao`")


def check_levers(cfg: Config, device: torch.device, compute_dtype: torch.dtype, compiling: bool) -> None:
    """Every speed switch against this device, before any data is read or any step runs."""
    hidden, _, heads = cfg.model.resolved()
    check_attention(cfg.model.attention, device, hidden // heads, compute_dtype)
    check_update(cfg.train.update, device)
    check_compile_mode(cfg, device, compiling)
    check_compile_toolchain(device, compiling)
    check_fp8(cfg.train.fp8, device)


def convert_fp8(model: nn.Module, recipe: str, filter_fn: Callable[[nn.Module, str], bool] = fp8_filter) -> list[str]:
    """Swap the linears ``filter_fn`` picks for torchao's Float8Linear (``recipe``: rowwise | tensorwise), in place;
    the parameters stay the same objects (an optimizer built before or after sees them). Returns their names."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    picked: list[str] = []

    def pick(module: nn.Module, fqn: str) -> bool:
        if filter_fn(module, fqn):
            picked.append(fqn)
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=pick, config=Float8LinearConfig.from_recipe_name(recipe))
    return picked


def apply_model_levers(model: nn.Module, cfg: Config) -> dict:
    """Set the model-side switches on every block of ``model`` (denoiser and encoder alike; call before compiling
    and before building the optimizer). Returns what it did: {switch: (value, modules touched)}."""
    done = {"attention": (cfg.model.attention, set_attention_backend(model, cfg.model.attention)),
            "mlp_epilogue": (cfg.model.mlp_epilogue, set_mlp_epilogue(model, cfg.model.mlp_epilogue))}
    if cfg.train.fp8 != "off":
        done["fp8"] = (cfg.train.fp8, convert_fp8(model, cfg.train.fp8))
    return done


def update_impl(choice: str, device: torch.device) -> str:
    """The concrete ``train.update``: auto is fused on CUDA and on the CPU (one kernel per parameter group; on the
    CPU 1.07-1.09x the main job's compiled step over foreach, bench/RESULTS.md), foreach elsewhere."""
    if choice != "auto":
        return choice
    return "fused" if device.type == "cuda" or (device.type == "cpu" and _has_fused_adamw("cpu")) else "foreach"


@functools.lru_cache(maxsize=None)
def _has_fused_adamw(device_type: str) -> bool:
    """Whether this torch runs AdamW(fused=True) on ``device_type`` (the CPU's came in torch 2.4)."""
    try:
        check_update("fused", torch.device(device_type))
        return True
    except ConfigError:
        return False


def ema_update_(ema: list[torch.Tensor], params: list[torch.Tensor], weight: float, impl: str) -> None:
    """ema += weight * (param - ema) for every pair: one multi-tensor ``_foreach_lerp_`` (fused/foreach), or one
    lerp per tensor (loop, the unfused reference). No host synchronisation either way."""
    detached = [p.detach() for p in params]
    if impl == "loop":
        for e, p in zip(ema, detached):
            e.lerp_(p, weight)
    else:
        torch._foreach_lerp_(ema, detached, weight)
