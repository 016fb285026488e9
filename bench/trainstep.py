"""Training steps to benchmark, built from the project's own pieces.

One step = forward, loss, backward, then the trainer's own ``apply_update`` (gradient clipping, AdamW
fused on CUDA, zero_grad, foreach EMA) and its finite/loss bookkeeping; random draws come from a
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
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastsemdiff import distributed
from fastsemdiff.config import Config, load_config
from fastsemdiff.diffusion import get_schedule, target
from fastsemdiff.flops import DiTShape, dit_train_flops, semantic_train_flops
from fastsemdiff.models import DiT, SemanticDiffusion
from fastsemdiff.train import apply_update, make_optimizer

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


def config_for(size: Size, impl: str) -> Config:
    backend = [f"model.backend={fused_backend()}"] if impl == "fused" else []
    return load_config(None, [f"model.preset={size.preset}", f"model.patch_size={size.patch}",
                              f"data.image_size={size.image_size}", f"data.channels={size.channels}",
                              *MODEL_KEYS[impl], *backend])


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
        module.train()

    def __call__(self) -> torch.Tensor:
        gen = torch.Generator(self.device).manual_seed(self.step)
        with self.autocast:
            loss = self.loss_fn(gen)
        loss.backward()
        grad_norm = apply_update(self.params, self.optimizer, self.ema, self.step, self.cfg)
        self.finite &= torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        self.loss_sum += loss.detach()
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


def build_step(kind: str, size: Size, impl: str, device: torch.device) -> TrainStep:
    """The step of ``kind`` (``dit`` or ``joint``) for ``impl`` at ``size`` on ``device``."""
    if kind == "joint" and impl == "diffusers":
        raise ValueError("diffusers has no encoder: the joint step has no diffusers row")
    torch._dynamo.reset()
    if device.type == "cuda":  # the previous case's model, optimizer and compiled graphs
        gc.collect()
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    cfg = config_for(size, "torch_eager" if impl == "diffusers" else impl)
    compile_blocks = impl in ("torch_compile", "fused")
    B, m = size.batch_for(kind), cfg.model
    hidden, depth, heads = m.resolved()
    gen0 = torch.Generator(device).manual_seed(1234)
    x0 = torch.randn(B, size.channels, size.image_size, size.image_size, device=device, generator=gen0)

    if kind == "joint":
        core = SemanticDiffusion(cfg).to(device)
        rt = distributed.Runtime(0, 1, 0, device, "single", torch.bfloat16 if device.type == "cuda" else None)
        model = distributed.wrap(core, rt, "blocks" if compile_blocks else None).step
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
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    z = F.normalize(torch.randn(B, z_dim, device=device, generator=gen0), dim=-1)

    def loss_fn(gen):
        t, eps, x_t = noisy(gen)
        drop = torch.rand(B, device=device, generator=gen) < m.z_dropout
        out = model(x_t, t, z, drop)
        return (out.float() - target("eps", sch, t, x0, eps)).pow(2).mean()

    return TrainStep(model, loss_fn, cfg, device, flops, B)


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
