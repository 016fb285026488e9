"""Training steps to benchmark, built from the project's own pieces.

One step = forward, loss, backward, then the trainer's own ``apply_update`` (gradient clipping, AdamW
fused on CUDA and CPU, zero_grad, foreach EMA) and its finite/loss bookkeeping; random draws come from a
generator seeded per step on the device, as in ``fastsemdiff.train``. Implementations:

* ``torch_eager``: the plain-PyTorch reference (``model.backend=torch``, ``model.adaln=per_block``, DiT's layout);
* ``torch_compile``: the same under ``torch.compile``, per transformer block as the trainer compiles;
* ``fused``: the fused kernels named explicitly (``fused_backend``: ``cuda`` where ``fastsemdiff._C`` loads,
  else ``triton``; ``auto`` on a CPU, i.e. torch), ``model.adaln=stacked``, compiled per block (``auto`` would
  run torch on the H200, where the record has torch.compile ahead: bench/RESULTS.md);
* ``diffusers``: diffusers' ``DiTTransformer2DModel`` of the same size (random weights, nothing fetched).

Two kinds of step: ``dit``, the ``fastsemdiff.models.DiT`` denoiser alone with the eps-MSE loss on random
latents (conditioned on a random unit-norm z, as diffusers' DiT is on a class label), and ``joint``, the
``SemanticDiffusion`` loss of the project's default method (encoder + denoiser + consistency term).
``main_job_step`` is the main job's own step (``configs/fmnist-tiny.yaml``, compiled as the trainer compiles it).

``switches`` are config overrides of the speed switches (``fastsemdiff/levers.py``: model.attention,
model.mlp_epilogue, train.update, train.compile_mode, train.compile_scope, train.fp8), checked against the device
first (a ``ConfigError`` says why a switch cannot run here) and applied as the trainer applies them.
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fastsemdiff import distributed, levers
from fastsemdiff.config import Config, load_config
from fastsemdiff.diffusion import get_schedule, target
from fastsemdiff.flops import DiTShape, dit_train_flops, semantic_shapes, semantic_train_flops
from fastsemdiff.models import DiT, SemanticDiffusion
from fastsemdiff.train import apply_update, make_optimizer, resolve_compile

MAIN_JOB_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fmnist-tiny.yaml"

IMPLS = ("torch_eager", "torch_compile", "fused", "diffusers")
MODEL_KEYS = {"torch_eager": ["model.backend=torch", "model.adaln=per_block"],
              "torch_compile": ["model.backend=torch", "model.adaln=per_block"],
              "fused": ["model.adaln=stacked"],  # + model.backend=fused_backend()
              "diffusers": []}


@dataclass(frozen=True)
class Size:
    """A model size and the data it is benchmarked on."""

    label: str  # e.g. "DiT-XL/2"
    preset: str
    image_size: int
    channels: int
    patch: int
    batch: int
    joint_batch: int  # the joint step holds the encoder's activations too

    def batch_for(self, kind: str) -> int:
        return self.joint_batch if kind == "joint" else self.batch

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


# 32x32x4 latents with patch 2 = 256 tokens (DiT at 256x256 pixels); tiny is the CPU preset on 28x28x1.
GPU_SIZES = {"S2": Size("DiT-S/2", "S", 32, 4, 2, 256, 256), "B2": Size("DiT-B/2", "B", 32, 4, 2, 256, 256),
             "XL2": Size("DiT-XL/2", "XL", 32, 4, 2, 128, 64)}
CPU_SIZES = {"tiny": Size("tiny/7", "tiny", 28, 1, 7, 64, 64)}


def fused_backend() -> str:
    """The kernels the ``fused`` step runs: the CUDA C++ ones where the extension loads, else Triton; on a CPU
    ``auto`` (torch: the Triton interpreter is a correctness tool, not timed)."""
    if not torch.cuda.is_available():
        return "auto"
    from fastsemdiff.ops import _cuda

    return "cuda" if _cuda.available() else "triton"


def config_for(size: Size, impl: str, switches: Sequence[str] = ()) -> Config:
    backend = [f"model.backend={fused_backend()}"] if impl == "fused" else []
    return load_config(None, [f"model.preset={size.preset}", f"model.patch_size={size.patch}",
                              f"data.image_size={size.image_size}", f"data.channels={size.channels}",
                              *MODEL_KEYS[impl], *backend, *switches])


class TrainStep:
    """A callable that runs one full training step of ``loss_fn`` (given the step's generator)."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], cfg: Config,
                 device: torch.device, flops_per_sample: int, batch: int):
        self.module, self.loss_fn, self.cfg, self.device = module, loss_fn, cfg, device
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, device)
        self.ema = [p.detach().clone() for p in self.params]
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.flops = flops_per_sample * batch
        self.batch = batch
        self.step = 0
        self.graphs = cfg.train.compile_mode == "reduce-overhead"
        self.losses: list[torch.Tensor] = []  # detached, read only after timing (no sync inside a step)
        self.annotate = False  # profile_step.py: name the phases (step.forward/backward/update) for the profiler
        module.train()

    def _phase(self, name: str):
        return torch.profiler.record_function(f"step.{name}") if self.annotate else contextlib.nullcontext()

    def __call__(self) -> torch.Tensor:
        if self.graphs:  # CUDA graph trees: this step may overwrite the previous step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        gen = torch.Generator(self.device).manual_seed(self.step)
        with self._phase("forward"), self.autocast:
            loss = self.loss_fn(gen)
        with self._phase("backward"):
            loss.backward()
        with self._phase("update"):
            grad_norm = apply_update(self.params, self.optimizer, self.ema, self.step, self.cfg)
        self.finite &= torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        loss = loss.detach().clone() if self.graphs else loss.detach()
        self.loss_sum += loss
        self.losses.append(loss)
        self.step += 1
        return loss


def diffusers_dit(size: Size, hidden: int, depth: int, heads: int, mlp_ratio: float) -> torch.nn.Module:
    """diffusers' DiTTransformer2DModel with our size (its MLP is 4x wide, as DiT's)."""
    from diffusers import DiTTransformer2DModel

    if mlp_ratio != 4.0:
        raise ValueError("diffusers' DiT has a 4x MLP only")
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads,
                                 in_channels=size.channels, out_channels=size.channels, num_layers=depth,
                                 sample_size=size.image_size, patch_size=size.patch, num_embeds_ada_norm=1000)


def _fresh(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":  # the previous case's model, optimizer and compiled graphs
        gc.collect()
        torch.cuda.empty_cache()
    torch.manual_seed(0)


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_step(kind: str, size: Size, impl: str, device: torch.device, switches: Sequence[str] = ()) -> TrainStep:
    """The step of ``kind`` (``dit`` or ``joint``) for ``impl`` at ``size`` on ``device``, with the speed
    ``switches`` (config overrides) applied; a switch this device cannot run raises ConfigError."""
    if kind == "joint" and impl == "diffusers":
        raise ValueError("diffusers has no encoder: the joint step has no diffusers row")
    if switches and impl == "diffusers":
        raise ValueError("the speed switches are fastsemdiff's: diffusers' DiT has no row with them")
    _fresh(device)
    cfg = config_for(size, "torch_eager" if impl == "diffusers" else impl, switches)
    compile_blocks = impl in ("torch_compile", "fused")
    levers.check_levers(cfg, device, _compute_dtype(device), compiling=compile_blocks)
    mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
    B, m = size.batch_for(kind), cfg.model
    hidden, depth, heads = m.resolved()
    gen0 = torch.Generator(device).manual_seed(1234)
    x0 = torch.randn(B, size.channels, size.image_size, size.image_size, device=device, generator=gen0)

    if kind == "joint":
        core = SemanticDiffusion(cfg).to(device)
        levers.apply_model_levers(core, cfg)
        rt = distributed.Runtime(0, 1, 0, device, "single", torch.bfloat16 if device.type == "cuda" else None)
        scope = cfg.train.compile_scope if compile_blocks else None
        model = distributed.wrap(core, rt, scope, compile_mode=cfg.train.compile_mode).step
        return TrainStep(model, lambda gen: model(x0, core.draw_noise(x0, gen))[0], cfg, device, semantic_train_flops(cfg), B)

    sch = get_schedule(cfg.diffusion.schedule)
    shape = DiTShape(hidden, depth, heads, size.tokens, size.patch, size.channels, size.channels, m.mlp_ratio)
    z_dim = cfg.encoder.dim
    flops = dit_train_flops(shape, z_dim, m.cond_merge)

    def noisy(gen):
        t = sch.sample_t(B, device, gen)
        eps = torch.randn(x0.shape, device=device, generator=gen)
        return t, eps, sch.add_noise(x0, t, eps)

    if impl == "diffusers":
        model = diffusers_dit(size, hidden, depth, heads, m.mlp_ratio).to(device)
        labels = torch.randint(0, 1000, (B,), device=device, generator=gen0)

        def loss_fn(gen):
            t, eps, x_t = noisy(gen)
            out = model(x_t, timestep=t * 1000, class_labels=labels).sample
            return (out.float() - target("eps", sch, t, x0, eps)).pow(2).mean()

        return TrainStep(model, loss_fn, cfg, device, flops, B)

    model = DiT(size.image_size, size.patch, size.channels, hidden, depth, heads, mlp_ratio=m.mlp_ratio,
                z_dim=z_dim, cond_merge=m.cond_merge, qk_norm=m.qk_norm, backend=m.backend, adaln=m.adaln_layout(),
                rms_norm=m.rms_norm, fused_check=m.fused_check).to(device)
    levers.apply_model_levers(model, cfg)
    run = model
    if compile_blocks and cfg.train.compile_scope == "model":
        run = torch.compile(model, mode=mode)
    elif compile_blocks:
        for block in model.blocks:
            block.compile(mode=mode)
    z = F.normalize(torch.randn(B, z_dim, device=device, generator=gen0), dim=-1)

    def loss_fn(gen):
        t, eps, x_t = noisy(gen)
        drop = torch.rand(B, device=device, generator=gen) < m.z_dropout
        out = run(x_t, t, z, drop)
        return (out.float() - target("eps", sch, t, x0, eps)).pow(2).mean()

    return TrainStep(model, loss_fn, cfg, device, flops, B)


def main_job_step(device: torch.device, switches: Sequence[str] = (), batch: int | None = None) -> TrainStep:
    """The main job's training step (``configs/fmnist-tiny.yaml`` with ``switches``): its model, compiled as the
    trainer compiles it on ``device`` (per block on CUDA, eager on CPU), at its batch size (or ``batch``), on random
    images in the data's range (the step's cost does not depend on the pixels)."""
    _fresh(device)
    cfg = load_config(str(MAIN_JOB_CONFIG), list(switches))
    scope = resolve_compile(cfg, device)
    levers.check_levers(cfg, device, _compute_dtype(device), compiling=scope is not None)
    B = batch or cfg.train.batch_size
    core = SemanticDiffusion(cfg).to(device)
    levers.apply_model_levers(core, cfg)
    rt = distributed.Runtime(0, 1, 0, device, "single", torch.bfloat16 if device.type == "cuda" else None)
    model = distributed.wrap(core, rt, scope, compile_mode=cfg.train.compile_mode).step
    d = cfg.data
    x0 = torch.rand(B, d.channels, d.image_size, d.image_size, device=device,
                    generator=torch.Generator(device).manual_seed(1234)) * 2 - 1
    # FLOPs of the denoiser alone: fastsemdiff.flops counts a ViT encoder, and the main job's is a CNN
    den, _ = semantic_shapes(cfg)
    return TrainStep(model, lambda gen: model(x0, core.draw_noise(x0, gen))[0], cfg, device,
                     dit_train_flops(den, cfg.encoder.dim, cfg.model.cond_merge), B)


def time_steps(step: TrainStep, warmup: int, steps: int, peak_tflops: float | None = None) -> dict:
    """Run ``warmup`` untimed steps then ``steps`` timed ones (one sync at each end: the steps queue as they
    would in training). Returns ms per step, images/s, TFLOP/s, MFU (with a peak), the mean loss of the last
    quarter of all steps run so far and whether every loss and gradient norm was finite."""
    sync = torch.cuda.synchronize if step.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    s = (time.perf_counter() - start) / max(1, steps)
    tail = step.losses[-max(1, len(step.losses) // 4):]
    out = {"ms": round(s * 1e3, 3), "images_per_s": round(step.batch / s, 1),
           "tflop_per_s": round(step.flops / s / 1e12, 4), "steps": step.step,
           "loss_last_quarter": round(float(torch.stack(tail).float().mean()), 5), "finite": bool(step.finite)}
    if peak_tflops:
        out["mfu_pct"] = round(100 * step.flops / s / 1e12 / peak_tflops, 1)
    return out


def count_host_syncs(fn: Callable[[], object]) -> int:
    """How many times ``fn`` makes the host wait for the GPU (torch's sync debug mode, counted as warnings)."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# What a dry run's tables say above their figures (bench/profile_step.py, bench/switch_matrix.py).
DRY_RUN_BANNER = ("DRY RUN on a CPU (tiny shapes, 1 warm-up and 2 timed steps on a shared machine): the code paths ran; "
                  "the figures mean nothing.\n\n")
