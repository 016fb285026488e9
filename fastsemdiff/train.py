"""Training entry point: ``torchrun -m fastsemdiff.train [--config F.yaml] [--resume] [key=value ...]``.

Read top to bottom: config -> runtime -> data -> model -> (resume) -> loop -> export. Every source of
randomness in a step (batch indices, flips, t, noise, z-dropout) is drawn from generators seeded by
(seed, step, rank), so a resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed, levers
from .config import Config, ConfigError, load_config
from .data import DatasetError, build_train_data, load_split, mix_seed, resolve_latents_config
from .errors import CheckpointError, TrainingDiverged
from .export import save_weights
from .distributed import Wrapped
from .models import SemanticDiffusion
from .probe import knn_accuracy


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    tc = cfg.train
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def every(done: int, period: int) -> bool:
    """Whether step ``done`` ends a period of ``period`` steps; a period of 0 never does (the switch is off)."""
    return period > 0 and done % period == 0


def ema_decay_at(step: int, cfg: Config) -> float:
    """EMA decay with a warm start, so short runs are not dominated by the initial weights."""
    return min(cfg.train.ema_decay, (1 + step) / (10 + step))


def make_optimizer(params: list[torch.Tensor], cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params`` as ``train.update`` says (``levers.update_impl``): fused (one sync-free kernel per
    group; auto on CUDA and CPU), foreach (multi-tensor ops; auto elsewhere) or loop (one op per tensor)."""
    tc = cfg.train
    impl = levers.update_impl(tc.update, device)
    kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, **kind)


def apply_update(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, ema: list[torch.Tensor], step: int,
                 cfg: Config) -> torch.Tensor:
    """Everything of a step after the backward: clip the gradients, step the optimizer at this step's
    learning rate, drop the gradients and move the EMA (one ``torch._foreach_lerp_``, or per tensor with
    train.update=loop). Returns the gradient norm as a tensor: nothing here waits for the device."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    loop = cfg.train.update == "loop"
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip, foreach=not loop)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    levers.ema_update_(ema, params, 1.0 - ema_decay_at(step, cfg), "loop" if loop else "foreach")
    return grad_norm


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class QuickProbe:
    """kNN accuracy of z at t = 0 on a fixed small labelled subset: a cheap signal during training."""

    def __init__(self, cfg: Config, device: torch.device, n_train: int = 2000, n_test: int = 1000):
        d = cfg.data
        self.train = [x[:n_train] for x in load_split(d.source, d.path, "train", d.image_size, d.channels)]
        try:
            self.test = [x[:n_test] for x in load_split(d.source, d.path, "test", d.image_size, d.channels)]
        except DatasetError:  # a folder without a test split: hold out part of train instead
            self.test = [x[n_train:n_train + n_test] for x in load_split(d.source, d.path, "train", d.image_size,
                                                                          d.channels)]

    @torch.no_grad()
    def __call__(self, model: SemanticDiffusion) -> float:
        sharded = hasattr(model, "unshard")  # FSDP2: the root's own parameters are gathered only in forward
        if sharded:
            model.unshard()
        model.eval()
        ztr, zte = model.embed(self.train[0], 0.0).cpu(), model.embed(self.test[0], 0.0).cpu()
        model.train()
        if sharded:
            model.reshard()
        return knn_accuracy(ztr, self.train[1], zte, self.test[1], k=20)


def parse_args(argv: Optional[list[str]]) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog="python -m fastsemdiff.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with sections model, encoder, diffusion, data, train, eval")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 model.preset=S")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    return cfg, args.resume or cfg.train.resume


def resolve_compile(cfg: Config, device: torch.device) -> Optional[str]:
    """What ``torch.compile`` covers: None (eager), "blocks" or "model" (``train.compile_scope``)."""
    on = cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")
    return cfg.train.compile_scope if on else None


def forward_backward(model: Wrapped, core: SemanticDiffusion, x0: torch.Tensor, labels: torch.Tensor,
                     gen: torch.Generator, grad_accum: int, autocast) -> tuple[torch.Tensor, dict]:
    """The step's loss and gradients over ``grad_accum`` equal micro-batches of this rank's batch.

    The step's draws are made once for the whole batch and sliced, so the accumulated loss is the mean of
    the micro-batch means, i.e. the unaccumulated step's loss; only the last backward syncs gradients."""
    noise = core.draw_noise(x0, gen)
    size = x0.shape[0] // grad_accum
    total, parts_sum = torch.zeros((), device=x0.device), {}
    for m in range(grad_accum):
        lo, hi = m * size, (m + 1) * size
        with distributed.no_gradient_sync(model.module, skip=m < grad_accum - 1):
            with autocast:  # labels reach the loss only for encoder.objective=supervised (the ceiling baseline)
                loss, parts = model.step(x0[lo:hi], noise.slice(lo, hi), labels[lo:hi])
            (loss / grad_accum).backward()
        total += loss.detach() / grad_accum
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0) + v / grad_accum
    return total, parts_sum


def train(cfg: Config, resume: bool = False) -> Path:
    cfg = resolve_latents_config(cfg)  # data.source=latents: input shape, VAE and scaling from the manifest
    tc = cfg.train
    rt = distributed.setup(tc.parallel, tc.precision, tc.threads)
    run_dir = Path(tc.run_dir)
    if tc.batch_size % (rt.world_size * tc.grad_accum):
        raise ConfigError(f"train.batch_size={tc.batch_size} does not split into {rt.world_size} process(es) x "
                          f"train.grad_accum={tc.grad_accum} equal micro-batches; choose a batch size divisible "
                          f"by {rt.world_size * tc.grad_accum}")
    local_batch = tc.batch_size // rt.world_size
    # the speed switches against this device, before any data is read: a choice it cannot run stops here
    levers.check_levers(cfg, rt.device, rt.dtype or torch.float32, resolve_compile(cfg, rt.device) is not None)
    if resolve_compile(cfg, rt.device) == "model" and rt.parallel in distributed.SHARDED:
        raise ConfigError(f"train.compile_scope=model is not supported with train.parallel={rt.parallel}: FSDP2's "
                          "per-block gathers run between the blocks; use train.compile_scope=blocks")

    # ---- resume guard: never silently start over a run that has checkpoints
    latest = ckpt.latest_checkpoint(run_dir)
    if resume and latest is None:
        raise CheckpointError(f"--resume given but {ckpt.checkpoint_dir(run_dir)} holds no complete checkpoint")
    if not resume and latest is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints (latest {latest.name}); pass --resume to "
                              "continue it, or choose a new train.run_dir")

    # ---- data: arrays live on the device; image folders stream through DALI (or PIL DataLoader workers);
    #      latents stay on the device when they fit, else stream from memory-mapped shards
    d = cfg.data
    say = (lambda msg: print(f"fastsemdiff: {msg}", flush=True)) if rt.is_main else (lambda msg: None)
    data = build_train_data(d, batch_size=local_batch, rank=rt.rank, world_size=rt.world_size, seed=tc.seed,
                            device=rt.device, say=say, latents=cfg.latents)
    probe = QuickProbe(cfg, rt.device) if tc.probe_every else None

    # ---- model, identical on every rank before sharding; a resumed run keeps its checkpoint's adaLN layout
    layout = cfg.model.adaln_layout(sharded=rt.parallel in distributed.SHARDED)
    if resume:
        try:
            layout = ckpt.adaln_layout(latest) or layout
        except Exception:  # unreadable metadata: load_checkpoint below reports it with the fix
            pass
    torch.manual_seed(tc.seed)
    core = SemanticDiffusion(cfg, adaln=layout).to(rt.device)
    applied = levers.apply_model_levers(core, cfg)
    if "fp8" in applied:
        say(f"float8 training ({tc.fp8}) of {len(applied['fp8'][1])} linears (levers.fp8_filter)")
    model = distributed.wrap(core, rt, resolve_compile(cfg, rt.device), tc.activation_checkpointing, tc.compile_mode)
    params = [p for p in model.module.parameters() if p.requires_grad]
    names = [n for n, p in core.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, rt.device)
    ema = {n: p.detach().clone() for n, p in zip(names, params)}
    ema_list = list(ema.values())
    saver = ckpt.AsyncCheckpointer() if tc.async_save else None

    start = 0
    if resume:  # the newest checkpoint that reads (a corrupt one is set aside, saying so); same config only
        latest, start = ckpt.resume_latest(run_dir, model.module, optimizer, ema, cfg, say)
        data.load_state(ckpt.load_data_state(latest, rt.rank, rt.world_size))
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:  # steps after the checkpoint were logged by the run that stopped: they are logged again
            ckpt.drop_metrics_after(run_dir / "metrics.jsonl", start)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        n_params = sum(p.numel() for p in core.parameters())
        print(f"fastsemdiff: {n_params / 1e6:.2f}M parameters, {rt.parallel} on {rt.world_size} x {rt.device.type}, "
              f"{len(data)} images ({data.name} loader), steps {start}->{tc.steps}, run dir {run_dir}", flush=True)

    # bf16 in every mode through autocast (under FSDP2 the parameters are also gathered in bf16): the
    # images and the diffusion target stay fp32, as do the parts autocast keeps in fp32.
    autocast = torch.autocast(rt.device.type, dtype=rt.dtype) if rt.dtype else contextlib.nullcontext()
    metrics = open(run_dir / "metrics.jsonl", "a") if rt.is_main else None
    bar = tqdm(total=tc.steps, initial=start, disable=not (rt.is_main and tc.progress), dynamic_ncols=True)
    finite = torch.ones((), dtype=torch.bool, device=rt.device)
    last_good = latest if resume else None
    t_log, n_log, loss_sum = time.perf_counter(), 0, torch.zeros((), device=rt.device)

    model.step.train()
    graphs = tc.compile_mode == "reduce-overhead"  # CUDA graph trees: each step's outputs are the last step's
    for step in range(start, tc.steps):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        gen = torch.Generator(rt.device).manual_seed(mix_seed(tc.seed, step, rt.rank, 1))
        x0, labels = data.batch(step)
        loss, parts = forward_backward(model, core, x0, labels, gen, tc.grad_accum, autocast)
        grad_norm = apply_update(params, optimizer, ema_list, step, cfg)
        local_norm = grad_norm.to_local() if hasattr(grad_norm, "to_local") else grad_norm
        finite &= torch.isfinite(loss.detach()) & torch.isfinite(local_norm)
        loss_sum += loss.detach()
        n_log += 1
        done = step + 1

        if done % tc.log_every == 0 or done == tc.steps or every(done, tc.ckpt_every):
            saving = saver is not None and saver.writing()  # a background save still writing on this rank
            if rt.world_size > 1 and dist.is_initialized():
                # One collective gives the mean loss over ranks and makes every rank take the same branch: a
                # NaN seen by one rank alone would otherwise leave the others waiting in the next checkpoint
                # (and a background save is completed only once every rank has written its part).
                summed = torch.stack([loss_sum, (~finite).float(), torch.tensor(float(saving), device=rt.device)])
                dist.all_reduce(summed)
                loss_sum, finite, saving = summed[0] / rt.world_size, summed[1] == 0, bool(summed[2] > 0)
            if saver and (not saving or not bool(finite)):  # good weights: checked finite before the save began
                last_good = saver.finish(cfg, tc.keep_last) or last_good
            if not bool(finite):
                raise TrainingDiverged(
                    f"loss or gradient norm became NaN/inf between steps {done - n_log} and {done}; the last good "
                    "checkpoint is "
                    f"{last_good or 'none (no checkpoint was written yet)'}. Lower train.lr or raise train.warmup_steps."
                )
            elapsed = time.perf_counter() - t_log
            rec = {"step": done, "loss": float(loss_sum) / n_log, "lr": lr_at(step, cfg),
                   "grad_norm": float(full_tensor(grad_norm)), "img_per_s": n_log * tc.batch_size / elapsed,
                   **{k: float(v) for k, v in parts.items()}}
            if data.skipped:
                rec["skipped_images"] = data.skipped
            if probe and every(done, tc.probe_every):
                rec["knn_t0"] = probe(core)
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            t_log, n_log, loss_sum = time.perf_counter(), 0, torch.zeros((), device=rt.device)
        bar.update(1)
        if every(done, tc.ckpt_every) or done == tc.steps:
            if saver:
                saver.save(run_dir, done, model.module, optimizer, ema, cfg, tc.keep_last, data_state=data.state())
            else:
                last_good = ckpt.save_checkpoint(run_dir, done, model.module, optimizer, ema, cfg, tc.keep_last,
                                                 data_state=data.state())
    if saver:
        saver.finish(cfg, tc.keep_last)
    bar.close()
    data.close()

    # ---- export the EMA weights (gathered from the shards) with the config
    full = {n: full_tensor(e) for n, e in ema.items()}  # collective under FSDP: every rank gathers
    for n, p in core.named_parameters():  # frozen parameters (none by default) are exported as they are
        if n not in full:
            full[n] = full_tensor(p.detach())
    if rt.is_main:
        path = save_weights(full, cfg, run_dir / "model.safetensors")
        print(f"fastsemdiff: wrote {path}", flush=True)
        metrics.close()
    if dist.is_initialized():
        dist.barrier()
    return run_dir


def main(argv: Optional[list[str]] = None) -> None:
    distributed.run_command("fastsemdiff.train", lambda: train(*parse_args(argv)),
                            (ConfigError, DatasetError, CheckpointError, TrainingDiverged))


if __name__ == "__main__":
    main()
    distributed.exit_if_gloo_outlives_the_group()
