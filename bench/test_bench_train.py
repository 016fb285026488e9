"""Training-step throughput: images/s and MFU of a full step (forward, backward, AdamW, EMA), in one run for
the plain-PyTorch reference eager, the reference under torch.compile, the fused model and diffusers' DiT.

    pytest bench/ --benchmark-only -k train -s        # add --benchmark-json bench.json, then bench/report.py

GPU (bf16 autocast, fp32 weights): DiT-S/2, DiT-B/2 (batch 256) and DiT-XL/2 (batch 128; 64 for the joint
step) at 256 tokens, the DiT alone and the joint encoder + denoiser step (a case that does not fit skips and
says so). CPU (fp32): the tiny preset (16 tokens, batch 64), both kinds, against diffusers' DiT of the same
size, the implementations taking turns step by step. Model FLOPs come from ``fastsemdiff.flops`` (the same
count for every implementation of a size); MFU is against the device's dense bf16 peak (``PEAK_TFLOPS``), and
on CPU the achieved TFLOP/s is reported against the fp32 matmul measured in the same run. On GPU each record
also carries ``host_syncs``: how often one step (after warm-up) made the host wait for the device.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fastsemdiff.flops import peak_tflops

from benchutil import DEVICE, DEVICE_NAME, HAS_CUDA, bench_call, oom_skip
from trainstep import CPU_SIZES, GPU_SIZES, IMPLS, build_step, count_host_syncs

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
# scripts/gpu_check.py --dry-run: the CPU case with two rounds of the reference eager and the fused model only.
QUICK = os.environ.get("FASTSEMDIFF_BENCH_QUICK") == "1"
SIZES = {**GPU_SIZES, **CPU_SIZES}
CASES = [(kind, size, impl) for size in SIZES for kind in ("dit", "joint") for impl in IMPLS
         if not (kind == "joint" and impl == "diffusers")]


@pytest.mark.parametrize("kind,size_id,impl", CASES, ids=[f"{k}-{s}-{i}" for k, s, i in CASES])
def test_train_step(benchmark, matmul_ceiling_tflops, kind, size_id, impl):
    size = SIZES[size_id]
    if size_id in GPU_SIZES and not HAS_CUDA:
        pytest.skip(f"GPU case ({size.label} at {size.tokens} tokens): no CUDA device on this machine")
    if size_id in CPU_SIZES:
        pytest.skip("on a CPU the implementations take turns step by step (test_train_step_cpu_interleaved): timed "
                    "one after the other, a shared CPU's changing load would decide their ratios")
    if impl == "diffusers" and not HAS_DIFFUSERS:
        pytest.skip("diffusers is absent (the optional 'peers' extra: pip install -e '.[peers]')")
    batch = size.batch_for(kind)
    benchmark.group = f"train-{kind}-{size.label}-b{batch}"
    try:
        step = build_step(kind, size, impl, DEVICE)
        for _ in range(3 if HAS_CUDA else 2):  # compilation, autotuning, allocator, AdamW state
            step()
        syncs = count_host_syncs(step) if HAS_CUDA else None
        reps, rounds = (5, 5) if HAS_CUDA else (1, 6)
        info = dict(impl=impl, kind=kind, model=size.label, tokens=size.tokens, batch=batch,
                    dtype="bf16 autocast" if HAS_CUDA else "fp32")
        per_step = bench_call(benchmark, step, reps, rounds, flops=step.flops, ceiling_tflops=matmul_ceiling_tflops,
                              warmup=False, **info)
    except torch.OutOfMemoryError as e:
        oom_skip(e, f"{kind} step of {size.label} at batch {batch}, {impl}")
    assert bool(step.finite), f"{impl} {kind} {size.label}: the loss or the gradient norm is not finite"
    images_per_s = batch / per_step
    tflops = step.flops / per_step / 1e12
    benchmark.extra_info.update(images_per_s=round(images_per_s, 1), flops_per_image=step.flops // batch)
    peak = peak_tflops(DEVICE_NAME) if HAS_CUDA else None
    if peak:
        benchmark.extra_info.update(peak_tflops=peak, mfu_pct=round(100 * tflops / peak, 1))
    if syncs is not None:
        benchmark.extra_info["host_syncs"] = syncs
    from benchutil import TIMINGS  # the summary's copy was taken before images/s was known

    TIMINGS[benchmark.group][impl].update({k: benchmark.extra_info[k] for k in ("images_per_s", "mfu_pct")
                                           if k in benchmark.extra_info})
    mfu = (f"MFU {100 * tflops / peak:.1f}%" if peak
           else f"{tflops:.3f} TFLOP/s = {100 * tflops / matmul_ceiling_tflops:.0f}% of the matmul ceiling")
    print(f"\n[bench] train {kind} {size.label} b{batch} {impl}: {per_step * 1e3:.1f} ms/step, "
          f"{images_per_s:.0f} img/s, {mfu}" + (f", {syncs} host syncs/step" if syncs is not None else ""))



@pytest.mark.skipif(HAS_CUDA, reason="CPU case: on a GPU the per-implementation cases give the ratios")
@pytest.mark.parametrize("kind", ["dit", "joint"])
def test_train_step_cpu_interleaved(benchmark, matmul_ceiling_tflops, kind):
    """The tiny preset's step for every implementation (diffusers' DiT for the DiT alone), one step of each in
    turn per round, so load from other work on a shared CPU hits all of them alike; the ratios come from the
    per-implementation medians. The benchmark's own time is one round (all implementations)."""
    from benchutil import TIMINGS, interleaved_medians

    size = CPU_SIZES["tiny"]
    batch = size.batch_for(kind)
    impls = [i for i in IMPLS if not (i == "diffusers" and (kind == "joint" or not HAS_DIFFUSERS))]
    if QUICK:
        impls = [i for i in impls if i in ("torch_eager", "fused")]
    rounds = 2 if QUICK else 6
    steps = {impl: build_step(kind, size, impl, DEVICE) for impl in impls}  # built first: build_step resets dynamo
    for step in steps.values():
        step(), step()  # compilation, AdamW state
    benchmark.group = f"train-{kind}-{size.label}-b{batch}-interleaved"
    medians = interleaved_medians(benchmark, steps, rounds)
    flops = steps[impls[0]].flops
    per_impl = {}
    for impl in impls:
        assert bool(steps[impl].finite), f"{impl}: the loss or the gradient norm is not finite"
        s = medians[impl]
        per_impl[impl] = {"ms": round(s * 1e3, 2), "images_per_s": round(batch / s, 1),
                          "tflop_per_s": round(flops / s / 1e12, 4)}
        TIMINGS.setdefault(benchmark.group, {})[impl] = {"s": s, "images_per_s": per_impl[impl]["images_per_s"],
                                                         "tflop_per_s": per_impl[impl]["tflop_per_s"]}
    benchmark.extra_info.update(impl="interleaved", kind=kind, model=size.label, tokens=size.tokens, batch=batch,
                                dtype="fp32", device="cpu", torch=torch.__version__, flops=flops,
                                ceiling_tflops=round(matmul_ceiling_tflops, 4), interleaved=per_impl, quick=QUICK)
    line = ", ".join(f"{i} {v['images_per_s']:.0f} img/s" for i, v in per_impl.items())
    for base in ("torch_eager", "torch_compile", "diffusers"):
        if base in per_impl:
            ratio = per_impl[base]["ms"] / per_impl["fused"]["ms"]
            benchmark.extra_info[f"fused_over_{base}"] = round(ratio, 2)
            line += f"; fused / {base} = {ratio:.2f}x"
    print(f"\n[bench] train {kind} {size.label} b{batch} interleaved on CPU: {line}")
