"""Typed configuration: dataclasses, a YAML file and ``key=value`` overrides.

Every key is checked against the dataclasses, so a typo fails at start with the list of valid keys
instead of being silently ignored hours into a run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix (unknown key, wrong type, bad value)."""


# Preset name -> (hidden size, depth, heads). S..XL follow the DiT paper; tiny is sized for 2 CPU cores.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@dataclass
class ModelConfig:
    """The denoiser DiT and what it shares with the encoder (width, heads, patch size)."""

    preset: str = "tiny"
    patch_size: int = 7  # 28x28 Fashion-MNIST -> 16 tokens: the CPU default; use 2 or 4 on GPUs
    hidden_size: Optional[int] = None  # None: from the preset
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    cond_merge: str = "add"  # add | concat: how Linear(z) joins the timestep embedding
    z_dropout: float = 0.1  # probability of replacing z by the learned null vector
    # Training only: this share of the denoiser's input tokens is replaced by a learned mask token. Its eps is
    # unknowable there, so those tokens are scored on x0 instead (weight mask_loss_weight): at low t, where
    # x_t alone gives x0 away, the masked patches can come only from z (0: off)
    token_mask: float = 0.0
    mask_loss_weight: float = 1.0
    backend: str = "auto"  # auto | torch | triton | cuda, decided per call by fastsemdiff.ops.dispatch
    fused_check: str = "warn"  # warn | error | off: a fused kernel failing its first-use check on a GPU falls back
    # auto: stacked (every block's adaLN in one matrix product) for one process and DDP, per_block (DiT's
    # layout) under FSDP/HSDP, so each block's adaLN weights are gathered with that block | stacked | per_block
    adaln: str = "auto"
    rms_norm: bool = False  # RMSNorm instead of LayerNorm in the blocks (LightningDiT-style)
    # Fixed 2-D sin-cos positions: "dit" puts the column in the first half of the channels and the row in the
    # second (facebookresearch/DiT, MAE); "rows_first" is the transposed table of models saved before this key.
    pos_layout: str = "dit"
    # ---- the training step's speed switches (fastsemdiff/levers.py checks them against the device at start)
    # auto: SDPA picks per call (torch's own order) | flash | efficient | cudnn | math: that SDPA backend only |
    # flash_attn: the flash-attn package (CUDA, bf16). A choice the device cannot run stops the run at start.
    attention: str = "auto"
    # off: fc1 -> GELU(tanh) as two ops | addmm: bias + tanh-GELU in fc1's matmul epilogue (torch._addmm_activation,
    # cuBLASLt on CUDA); its backward recomputes the pre-activation (one more matmul, less activation memory)
    mlp_epilogue: str = "off"

    def tokens(self, side: int) -> int:
        """The denoiser's input tokens for a square input of ``side``: (side / patch_size)^2."""
        return (side // self.patch_size) ** 2

    def masked_tokens(self, side: int) -> int:
        """How many of the denoiser's input tokens ``token_mask`` hides per image."""
        return round(self.token_mask * self.tokens(side))

    def resolved(self) -> tuple[int, int, int]:
        """(hidden, depth, heads) after applying the preset."""
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        hidden, depth, heads = PRESETS[self.preset]
        return (self.hidden_size or hidden, self.depth or depth, self.num_heads or heads)

    def adaln_layout(self, sharded: bool = False) -> str:
        """The concrete adaLN layout: ``auto`` is per_block when the blocks are sharded (FSDP/HSDP), where a
        stacked matrix would sit in the root unit, gathered before any compute; stacked otherwise."""
        if self.adaln != "auto":
            return self.adaln
        return "per_block" if sharded else "stacked"


@dataclass
class EncoderConfig:
    """The timestep-dependent encoder E(x0, t) -> z in R^dim."""

    arch: str = "vit"  # vit: patch tokens through adaLN blocks | cnn: FiLM conv stages pooled to a grid
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 128])  # arch=cnn: one per stage
    conv_strides: list[int] = field(default_factory=lambda: [1, 2, 1, 2])  # arch=cnn: 28x28 -> 7x7
    # arch=cnn: residual FiLM convs after each stage's conv (h + f(h), one count per stage; []: none), each
    # branch starting at zero so the deeper encoder starts as the plain one
    conv_residual_blocks: list[int] = field(default_factory=list)
    # arch=cnn: the first conv stage that t modulates (FiLM); the stages before it are a trunk every t shares
    # (0: all stages; 3 with four stages: t reaches only the last map)
    conv_film_from: int = 0
    pool_grid: int = 2  # arch=cnn: the last map is average-pooled to pool_grid x pool_grid before the head
    input: str = "clean"  # clean: E(x0, t) | noisy: E(x_t, t)
    # The encoder's own view of x0 (the denoiser still reconstructs x0 itself): translated by up to
    # view_shift pixels (the border filled with the background, -1) and flipped left-right with view_flip,
    # drawn per sample, so z cannot carry what changes under them.
    view_shift: int = 0
    view_flip: bool = False
    # SODA-style stronger views for E alone: a random resized crop of area share in [min, max] ([]: none; aspect
    # ratio 3/4..4/3, resized back to the input side) and, with probability view_erase, an erased box
    # (RandomErasing's 2-33 % of the area, set to 0, mid-grey)
    view_crop_scale: list[float] = field(default_factory=list)
    view_erase: float = 0.0
    # A SimSiam/BYOL-style term across views (0: off): a predictor MLP on z_t of the view above is pulled, by
    # cosine, toward the stop-gradient z_t of a second view drawn the same way (one extra no-grad encoder pass)
    invariance_weight: float = 0.0
    time_conditioned: bool = True  # false: a diffae-style static code E(x0)
    # The encoder's t snapped to the nearest of these, in training and readout alike ([]: continuous t): a few
    # codes, each trained over the range of t it serves (e.g. [0, 0.5, 1], the multi-t readout's points)
    t_bins: list[float] = field(default_factory=list)
    normalize: bool = False  # L2-normalise z (the "directional vector"); off probed better (docs/ABLATIONS.md)
    depth: Optional[int] = None  # None: half the denoiser's depth
    dim: int = 128
    regularizer: str = "none"  # none | l1 | kl
    reg_weight: float = 1e-5
    # regularizer=kl: the code's log-variance per image from the head (input, VDRL's form) or per dimension and t
    # from the conditioning vector alone (time: half the head's parameters; read only when regularizer=kl)
    kl_variance: str = "input"
    objective: str = "self_conditional"  # self_conditional | supervised (the label-trained ceiling baseline)
    num_classes: int = 10  # supervised objective: classes of the linear head on z


@dataclass
class DiffusionConfig:
    schedule: str = "vp-cosine"  # vp-cosine | vp-linear | ve | flow
    prediction: str = "eps"  # eps | v | x0 | velocity
    lambda_cons: float = 0.0  # weight of the sequential-consistency term; 0.1 gained nothing (docs/ABLATIONS.md)
    cons_step: float = 0.05  # |t' - t| is drawn uniformly up to this
    # How training draws t (diffusion/timesteps.py): uniform, or logit-normal sigmoid(t_mean + t_std * N(0, 1));
    # then t_shift > 1 moves the draws toward noise (SD3's shift; 1: none). For the encoder's sake: z is needed
    # where the denoiser cannot guess x0 alone.
    t_sampling: str = "uniform"  # uniform | logit_normal
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0
    loss_weight: str = "none"  # none | min_snr: min(SNR, min_snr_gamma) on the x0-error, caps the low-noise terms
    min_snr_gamma: float = 5.0


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # fashion-mnist | folder (image folder or file list) | npz | latents (a manifest folder)
    path: str = "/usr/share/datasets/fashion-mnist"
    image_size: int = 28
    channels: int = 1
    hflip: bool = True
    loader: str = "auto"  # folders: auto (DALI if installed, else torch) | dali | torch; arrays stay on the device
    workers: int = 2  # DALI threads or DataLoader worker processes of the streaming loaders
    crop: str = "center"  # streaming loaders: center (short side to image_size) | random (random resized crop)
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # area range of the random crop
    bad_images: str = "skip"  # skip (and count) | error: what an unreadable image file does
    mixed_channels: str = "convert"  # convert | error: a folder mixing grey and colour images
    verify: str = "decode"  # decode | header: how the start-up scan checks each image file


@dataclass
class LatentsConfig:
    """data.source=latents: what the latents must be. Unset keys are filled from the manifest at start (the
    run's config.yaml records them); a key set here that the manifest contradicts stops the run."""

    vae: str = ""  # the VAE folder the latents were encoded with (checked by hash); "": the manifest's
    vae_hash: str = ""  # sha256 of the VAE's config and weights; "": the manifest's
    scaling_factor: Optional[float] = None  # latents = (mean - shift_factor) * scaling_factor; None: the manifest's
    shift_factor: Optional[float] = None
    channels: int = 0  # latent channels and side: the model's input shape; 0: the manifest's
    size: int = 0
    resident: str = "auto"  # auto (on the device when they fit) | device | stream (memory-mapped shards)


@dataclass
class TrainConfig:
    run_dir: str = "runs/fmnist-tiny"
    steps: int = 2000
    batch_size: int = 256  # global, split over ranks
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    parallel: str = "auto"  # auto | fsdp | hsdp (replicate across nodes, shard within) | ddp | single
    compile: str = "auto"  # auto (on for CUDA) | on | off
    compile_scope: str = "blocks"  # blocks (each transformer block) | model (the whole loss, one graph)
    grad_accum: int = 1  # micro-batches per optimizer step; the global batch_size stays as set
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    async_save: bool = False  # checkpoints written in a background thread (DCP async_save), still atomic
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    log_every: int = 20
    ckpt_every: int = 500  # checkpoint every N steps; 0: only at the end
    keep_last: int = 2
    probe_every: int = 0  # quick kNN probe every N steps; 0 turns it off
    resume: bool = False
    progress: bool = True
    # ---- the training step's speed switches (fastsemdiff/levers.py checks them against the device at start)
    # auto (fused on CUDA and CPU, foreach elsewhere) | fused | foreach | loop: how AdamW and the EMA run: fused (one
    # multi-tensor kernel per group, AdamW(fused=True)), foreach (multi-tensor ops), loop (one op per tensor)
    update: str = "auto"
    # torch.compile's mode: default | reduce-overhead (CUDA graphs; CUDA only) | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # off | rowwise | tensorwise: torchao float8 training of the blocks' token matmuls (levers.fp8_filter);
    # needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell) and torchao
    fp8: str = "off"


@dataclass
class EvalConfig:
    ts: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 0.7])
    # The multi-t readout's grid, some of ts; empty: all of ts. Codes at nearby t are nearly the same (a
    # linear map predicts z at t = 0.9 from z at t = 0 with R^2 = 0.90), so a few spread-out t carry what
    # the whole grid does at a fraction of the width (docs/ABLATIONS.md, "The multi-t readout").
    multi_ts: list[float] = field(default_factory=list)
    batch_size: int = 1000
    knn_k: int = 20


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> "Config":
        choices = {
            "model.cond_merge": (self.model.cond_merge, {"add", "concat"}),
            "model.backend": (self.model.backend, {"auto", "torch", "triton", "cuda"}),
            "model.fused_check": (self.model.fused_check, {"warn", "error", "off"}),
            "model.adaln": (self.model.adaln, {"auto", "stacked", "per_block"}),
            "model.pos_layout": (self.model.pos_layout, {"dit", "rows_first"}),
            "encoder.arch": (self.encoder.arch, {"vit", "cnn"}),
            "encoder.input": (self.encoder.input, {"clean", "noisy"}),
            "encoder.regularizer": (self.encoder.regularizer, {"none", "l1", "kl"}),
            "encoder.kl_variance": (self.encoder.kl_variance, {"input", "time"}),
            "encoder.objective": (self.encoder.objective, {"self_conditional", "supervised"}),
            "diffusion.schedule": (self.diffusion.schedule, {"vp-cosine", "vp-linear", "ve", "flow"}),
            "diffusion.prediction": (self.diffusion.prediction, {"eps", "v", "x0", "velocity"}),
            "diffusion.t_sampling": (self.diffusion.t_sampling, {"uniform", "logit_normal"}),
            "diffusion.loss_weight": (self.diffusion.loss_weight, {"none", "min_snr"}),
            "data.source": (self.data.source, {"fashion-mnist", "folder", "npz", "latents"}),
            "latents.resident": (self.latents.resident, {"auto", "device", "stream"}),
            "data.loader": (self.data.loader, {"auto", "dali", "torch"}),
            "data.crop": (self.data.crop, {"center", "random"}),
            "data.bad_images": (self.data.bad_images, {"skip", "error"}),
            "data.mixed_channels": (self.data.mixed_channels, {"convert", "error"}),
            "data.verify": (self.data.verify, {"decode", "header"}),
            "train.parallel": (self.train.parallel, {"auto", "fsdp", "hsdp", "ddp", "single"}),
            "train.compile": (self.train.compile, {"auto", "on", "off"}),
            "train.compile_scope": (self.train.compile_scope, {"blocks", "model"}),
            "train.precision": (self.train.precision, {"auto", "bf16", "fp32"}),
            "model.attention": (self.model.attention, {"auto", "flash", "efficient", "cudnn", "math", "flash_attn"}),
            "model.mlp_epilogue": (self.model.mlp_epilogue, {"off", "addmm"}),
            "train.update": (self.train.update, {"auto", "fused", "foreach", "loop"}),
            "train.compile_mode": (self.train.compile_mode, {"default", "reduce-overhead",
                                                             "max-autotune-no-cudagraphs"}),
            "train.fp8": (self.train.fp8, {"off", "rowwise", "tensorwise"}),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not valid; choose one of {sorted(allowed)}")
        hidden, depth, heads = self.model.resolved()
        positive = {
            "model.hidden_size": hidden, "model.depth": depth, "model.num_heads": heads,
            "model.patch_size": self.model.patch_size, "data.image_size": self.data.image_size,
            "data.channels": self.data.channels, "encoder.dim": self.encoder.dim,
        }
        if self.encoder.depth is not None:
            positive["encoder.depth"] = self.encoder.depth
        e = self.encoder
        if not e.conv_channels or len(e.conv_channels) != len(e.conv_strides) or min(e.conv_channels + e.conv_strides) < 1:
            raise ConfigError(f"encoder.conv_channels={e.conv_channels} and encoder.conv_strides={e.conv_strides} "
                              "must be lists of positive integers of the same length (one entry per conv stage)")
        if e.conv_residual_blocks and (len(e.conv_residual_blocks) != len(e.conv_channels)
                                       or min(e.conv_residual_blocks) < 0):
            raise ConfigError(f"encoder.conv_residual_blocks={e.conv_residual_blocks} must hold one count >= 0 per conv "
                              f"stage ({len(e.conv_channels)}, as encoder.conv_channels), or be [] for none")
        if not 0 <= e.conv_film_from < len(e.conv_channels):
            raise ConfigError(f"encoder.conv_film_from={e.conv_film_from} must name a conv stage, 0 to "
                              f"{len(e.conv_channels) - 1} (0: t modulates every stage)")
        if e.t_bins and (not e.time_conditioned or min(e.t_bins) < 0 or max(e.t_bins) > 1
                         or len(set(e.t_bins)) != len(e.t_bins)):
            raise ConfigError(f"encoder.t_bins={e.t_bins} must be distinct times in [0, 1] of a time-conditioned "
                              "encoder (encoder.time_conditioned=true), or [] for continuous t")
        positive["encoder.pool_grid"] = e.pool_grid
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value} must be a positive integer")
        if hidden % heads:
            raise ConfigError(f"model hidden size {hidden} is not divisible by num_heads {heads}")
        if hidden % 4:
            raise ConfigError(f"model hidden size {hidden} must be divisible by 4 (2-D sin-cos positions)")
        side, what = self.input_side()
        if e.view_shift < 0 or (side and e.view_shift >= side // 2):
            raise ConfigError(f"encoder.view_shift={e.view_shift} must be 0 (off) or a few pixels, less than half "
                              f"the input side ({what}={side})")
        crop = e.view_crop_scale
        if crop and (len(crop) != 2 or not 0.0 < crop[0] <= crop[1] <= 1.0):
            raise ConfigError(f"encoder.view_crop_scale={crop} must be [] (no crop) or [min, max] area shares with "
                              "0 < min <= max <= 1, e.g. [0.35, 1.0]")
        if not 0.0 <= e.view_erase <= 1.0:
            raise ConfigError(f"encoder.view_erase={e.view_erase} is a probability: 0 (off) to 1")
        if e.invariance_weight < 0 or not math.isfinite(e.invariance_weight):
            raise ConfigError(f"encoder.invariance_weight={e.invariance_weight} must be 0 (off) or a positive weight")
        if e.invariance_weight > 0 and not (e.view_shift or e.view_flip or e.view_crop_scale or e.view_erase):
            raise ConfigError("encoder.invariance_weight > 0 pulls together z of two views of an image, but no view "
                              "is drawn: set encoder.view_crop_scale (e.g. [0.35,1.0]), encoder.view_flip, "
                              "encoder.view_shift or encoder.view_erase")
        if e.invariance_weight > 0 and e.objective == "supervised":
            raise ConfigError("encoder.invariance_weight is a term of the self-conditional loss; the supervised "
                              "baseline (encoder.objective=supervised) does not use it: set it to 0")
        if e.regularizer != "none" and e.objective == "supervised":
            raise ConfigError(f"encoder.regularizer={e.regularizer} is a term of the self-conditional loss; the "
                              "supervised baseline (encoder.objective=supervised) is the ceiling without it: set "
                              "encoder.regularizer=none")
        if side and side % self.model.patch_size:
            raise ConfigError(
                f"{what}={side} is not divisible by model.patch_size={self.model.patch_size}; choose a patch size "
                f"that divides it"
            )
        lo, hi = (self.data.crop_scale + [0.0, 0.0])[:2]
        if len(self.data.crop_scale) != 2 or not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"data.crop_scale={self.data.crop_scale} must be [min, max] with 0 < min <= max <= 1")
        if self.data.workers < 0:
            raise ConfigError(f"data.workers={self.data.workers} must be >= 0")
        if not 0.0 <= self.model.z_dropout < 1.0:
            raise ConfigError(f"model.z_dropout={self.model.z_dropout} must be in [0, 1)")
        self._check_token_mask(side)
        df = self.diffusion
        if df.t_std <= 0 or df.t_shift <= 0 or df.min_snr_gamma <= 0:
            raise ConfigError(f"diffusion.t_std={df.t_std}, diffusion.t_shift={df.t_shift} and diffusion.min_snr_gamma="
                              f"{df.min_snr_gamma} must be positive (t_shift=1 and loss_weight=none turn them off)")
        if df.loss_weight == "min_snr" and df.prediction == "velocity":
            raise ConfigError("diffusion.loss_weight=min_snr is defined for eps, v and x0 predictions; with "
                              "prediction=velocity set loss_weight=none")
        if self.train.steps < 1 or self.train.batch_size < 1:
            raise ConfigError("train.steps and train.batch_size must be positive")
        if self.train.log_every < 1:
            raise ConfigError(f"train.log_every={self.train.log_every}: it must be at least 1 (a log line every N steps)")
        for key in ("ckpt_every", "probe_every"):
            if getattr(self.train, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self.train, key)} is negative; use 0 to turn it off "
                                  "(a checkpoint is still written at the last step)" if key == "ckpt_every" else
                                  f"train.{key}={getattr(self.train, key)} is negative; use 0 to turn it off")
        if self.train.grad_accum < 1:
            raise ConfigError(f"train.grad_accum={self.train.grad_accum} must be at least 1 (1: no accumulation)")
        if self.train.compile_mode != "default" and self.train.compile == "off":
            raise ConfigError(f"train.compile_mode={self.train.compile_mode} needs torch.compile, but train.compile=off; "
                              "set train.compile=on (or auto on CUDA) or leave train.compile_mode=default")
        if any(not 0.0 <= t <= 1.0 for t in self.eval.ts):
            raise ConfigError(f"eval.ts={self.eval.ts} must lie in [0, 1] (0 = clean, 1 = pure noise)")
        if not set(self.eval.multi_ts) <= set(self.eval.ts):
            raise ConfigError(f"eval.multi_ts={self.eval.multi_ts} must be some of eval.ts={self.eval.ts}: the "
                              "multi-t readout concatenates embeddings the probe computes at eval.ts; add the "
                              "missing times to eval.ts")
        return self

    def _check_token_mask(self, side: int) -> None:
        m = self.model
        if not 0.0 <= m.token_mask < 1.0:
            raise ConfigError(f"model.token_mask={m.token_mask} is the share of the denoiser's input tokens hidden in "
                              "training: 0 (off) up to, not including, 1")
        if m.mask_loss_weight < 0 or not math.isfinite(m.mask_loss_weight):
            raise ConfigError(f"model.mask_loss_weight={m.mask_loss_weight} must be a finite weight >= 0")
        if m.token_mask == 0:
            return
        if self.encoder.objective == "supervised":
            raise ConfigError("model.token_mask masks the denoiser's input, which the supervised baseline "
                              "(encoder.objective=supervised) does not train: set it to 0")
        if side and side % m.patch_size == 0:
            tokens, hidden = m.tokens(side), m.masked_tokens(side)
            if not 0 < hidden < tokens:
                raise ConfigError(f"model.token_mask={m.token_mask} hides {hidden} of the denoiser's {tokens} tokens; "
                                  f"choose a share that hides at least one and leaves one visible "
                                  f"(between {0.5 / tokens:.3g} and {1 - 0.5 / tokens:.3g})")

    def input_side(self) -> tuple[int, str]:
        """(side of the model's input, the key it comes from): the latent side for data.source=latents (0 until
        the manifest has filled it in), the image side otherwise."""
        if self.data.source == "latents":
            return self.latents.size, "latents.size"
        return self.data.image_size, "data.image_size"


# Short aliases accepted on the command line.
ALIASES = {"preset": "model.preset", "steps": "train.steps", "run_dir": "train.run_dir"}


def valid_keys() -> list[str]:
    return [f"{section}.{name}" for section, sub in _field_types(Config).items() for name in _field_types(sub)]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotation ``typ``; ints are accepted where floats are expected."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (inner,) = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(key, v, inner) for v in value]
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if typ is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 reads on/off (and yes/no) as booleans: train.compile=on
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. preset=S is fine, model.preset=1 reads as "1" and fails validation
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {getattr(typ, '__name__', typ)}")


def _set(cfg: Config, key: str, value: Any) -> None:
    key = ALIASES.get(key, key)
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    section, name = parts
    hints = _field_types(Config)
    if section not in hints or name not in _field_types(hints[section]):
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    sub = getattr(cfg, section)
    setattr(sub, name, _coerce(key, value, _field_types(type(sub))[name]))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def from_dict(d: dict[str, Any]) -> Config:
    cfg = Config()
    for k, v in _flatten(d).items():
        _set(cfg, k, v)
    return cfg


# Keys added after files were first written whose default today differs from what those files did: a saved
# config without the key means this value (so an old model keeps its meaning), not today's default.
LEGACY_DEFAULTS: dict[str, Any] = {"model.pos_layout": "rows_first"}


def from_saved_dict(d: dict[str, Any]) -> Config:
    """A config as saved with a model or checkpoint: keys it lacks take their ``LEGACY_DEFAULTS`` value."""
    cfg = from_dict(d)
    present = _flatten(d)
    for key, value in LEGACY_DEFAULTS.items():
        if key not in present:
            _set(cfg, key, value)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides (values parsed as YAML scalars)."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections to keys")
        for k, v in _flatten(data).items():
            _set(cfg, k, v)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        _set(cfg, k.strip(), yaml.safe_load(v) if v.strip() else "")
    return cfg.validate()
