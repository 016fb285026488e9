"""The main job's CPU cost (configs/fmnist-tiny.yaml): its training step eager against torch.compile of the
whole loss (``train.compile=on train.compile_scope=model``), and the probe's embedding.

    pytest bench/test_bench_main_job.py --benchmark-only -s

Command 1's 20 minutes are spent here: about two thirds in the training step, a third of the probe in embedding
70,000 images at five t. The step's variants take turns step by step (a shared CPU's load hits both alike); the
ratio comes from the per-variant medians, and images/s is printed for each.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from benchutil import HAS_CUDA, TIMINGS, interleaved_medians

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fmnist-tiny.yaml"
pytestmark = pytest.mark.skipif(HAS_CUDA, reason="CPU case: the main job's recipe for 2 CPU cores")


def _model(seed: int = 0, overrides: tuple[str, ...] = ()):
    from fastsemdiff.config import load_config
    from fastsemdiff.models import SemanticDiffusion

    cfg = load_config(str(CONFIG), list(overrides))
    torch.manual_seed(seed)
    model = SemanticDiffusion(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # FiLM weights start at zero; a trained encoder's are not
        for stage in model.encoder.blocks:
            stage.film.weight.copy_(torch.randn(stage.film.weight.shape, generator=g) * 0.02)
    return cfg, model


def _step(compiled: bool, update: str | None = None, overrides: tuple[str, ...] = ()):
    """One training step of a fresh copy of the main job's model (forward, backward, AdamW, EMA), as the
    trainer runs it at the config's batch (32), fp32; ``update`` overrides ``train.update``, ``overrides`` the
    config."""
    from fastsemdiff import train as T

    cfg, model = _model(overrides=overrides)
    if update is not None:
        cfg.train.update = update
    params = [p for p in model.parameters() if p.requires_grad]
    opt = T.make_optimizer(params, cfg, torch.device("cpu"))
    ema = [p.detach().clone() for p in params]
    loss_fn = torch.compile(model) if compiled else model
    x0 = torch.rand(cfg.train.batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        loss, _ = loss_fn(x0, model.draw_noise(x0, torch.Generator().manual_seed(i)))
        loss.backward()
        T.apply_update(params, opt, ema, i, cfg)
        assert torch.isfinite(loss)

    return step, cfg.train.batch_size


def test_main_job_train_step(benchmark):
    (eager, batch), (compiled, _) = _step(False), _step(True)
    calls = {"eager": eager, "compiled": compiled}
    warm = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call(), call()
        warm[name] = time.perf_counter() - start  # the compiled step's includes its compilation
    benchmark.group = f"main-job-train-step-b{batch}"
    medians = interleaved_medians(benchmark, calls, rounds=20)
    out = {}
    for k, s in medians.items():
        out[k] = {"ms": round(s * 1e3, 2), "images_per_s": round(batch / s, 1), "first_two_steps_s": round(warm[k], 1)}
        TIMINGS.setdefault(benchmark.group, {})[k] = {"s": s, "images_per_s": out[k]["images_per_s"]}
    ratio = out["eager"]["ms"] / out["compiled"]["ms"]
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, per_variant=out, compiled_speedup=round(ratio, 3))
    print(f"\n[bench] main job step, batch {batch}, CPU: " + ", ".join(
        f"{k} {v['images_per_s']:.0f} img/s ({v['ms']:.1f} ms; first two steps {v['first_two_steps_s']} s)"
        for k, v in out.items()) + f"; compiled / eager {ratio:.2f}x")


def test_main_job_update_impl(benchmark):
    """The compiled step with AdamW as foreach multi-tensor ops (``train.update=auto`` until 2026-12-05) against
    torch's fused CPU AdamW (auto since; one vectorised kernel per parameter group): AdamW, clipping and the EMA
    are ~15 % of the eager step here (torch.profiler)."""
    (foreach, batch), (fused, _) = _step(True, "foreach"), _step(True, "fused")
    calls = {"foreach": foreach, "fused": fused}
    for call in calls.values():
        call(), call()
    benchmark.group = f"main-job-update-b{batch}"
    medians = interleaved_medians(benchmark, calls, rounds=20)
    ips = {k: round(batch / s, 1) for k, s in medians.items()}
    for k, s in medians.items():
        TIMINGS.setdefault(benchmark.group, {})[k] = {"s": s, "images_per_s": ips[k]}
    ratio = medians["foreach"] / medians["fused"]
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, images_per_s=ips, fused_speedup=round(ratio, 3))
    print(f"\n[bench] main job step (compiled), batch {batch}, CPU: AdamW foreach {ips['foreach']:.0f} img/s, fused "
          f"{ips['fused']:.0f} img/s; fused / foreach {ratio:.2f}x")


def test_main_job_kl_bottleneck(benchmark):
    """What the KL bottleneck on z costs the compiled step: none, the per-image log-variance (the recipe's
    ``encoder.kl_variance=input``: a second half of the head, 0.8M parameters) and the t-only one (``time``)."""
    variants = {"none": ("encoder.regularizer=none",), "kl input": (), "kl time": ("encoder.kl_variance=time",)}
    calls = {}
    for name, overrides in variants.items():
        calls[name], batch = _step(True, overrides=overrides)
        calls[name](), calls[name]()
    benchmark.group = f"main-job-kl-b{batch}"
    medians = interleaved_medians(benchmark, calls, rounds=30)
    ips = {k: round(batch / s, 1) for k, s in medians.items()}
    for k, s in medians.items():
        TIMINGS.setdefault(benchmark.group, {})[k] = {"s": s, "images_per_s": ips[k]}
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, images_per_s=ips)
    print(f"\n[bench] main job step (compiled), batch {batch}, CPU: " + ", ".join(
        f"{k} {v:.0f} img/s ({medians[k] * 1e3:.1f} ms, {medians[k] / medians['none']:.3f}x none's time)"
        for k, v in ips.items()))


def test_main_job_embed(benchmark):
    """The probe's embedding: E(x0, t) of 1,024 images in batches of ``eval.batch_size`` (256), no gradients."""
    cfg, model = _model()
    model.eval()
    images = (torch.rand(1024, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)

    def embed():
        with torch.inference_mode():
            return model.embed(images, 0.5, cfg.eval.batch_size)

    benchmark.group = "main-job-embed-1024"
    z = benchmark.pedantic(embed, rounds=5, iterations=1, warmup_rounds=1)
    assert z.shape == (1024, cfg.encoder.dim) and torch.isfinite(z).all()
    s = benchmark.stats.stats.median
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, images_per_s=round(1024 / s, 1))
    print(f"\n[bench] main job embedding (1,024 images, batches of {cfg.eval.batch_size}), CPU: {1024 / s:.0f} img/s")
