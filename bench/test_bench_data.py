"""Data-loading throughput: the DALI CPU pipeline against the PIL DataLoader path on the same folder
and the same 2 workers (the ratio is printed), and the device-resident dataset's cost per step.

    pytest bench/ --benchmark-only -k data -s

The folder is generated once per session: mostly JPEG photos-like images (smooth colour plus noise)
of mixed sizes around 320x240, a quarter PNG, decoded to 64x64 batches of 32. The GPU case ("mixed"
decoding against the training step's demand) runs only where CUDA and DALI are both present.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsemdiff.data import DeviceImageDataset, check_images, dali_available
from fastsemdiff.data.dali_stream import DaliStream
from fastsemdiff.data.torch_stream import TorchStream

N_IMAGES, BATCH, SIZE, WORKERS = 512, 32, 64, 2
STEPS = N_IMAGES // BATCH  # one epoch per round
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        w, h = int(rng.integers(280, 400)), int(rng.integers(200, 300))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        cls = root / f"class{i % 4}"
        cls.mkdir(exist_ok=True)
        if i % 4 == 3:
            Image.fromarray(pixels).save(cls / f"{i}.png")
        else:
            Image.fromarray(pixels).save(cls / f"{i}.jpg", quality=90)
    return root


def _stream(kind, folder: Path, device="cpu"):
    checked = check_images(folder, threads=WORKERS)
    cls = DaliStream if kind == "dali" else TorchStream
    return cls(checked, image_size=SIZE, channels=3, batch_size=BATCH, rank=0, world_size=1, seed=0, hflip=True,
               crop="center", crop_scale=(0.35, 1.0), workers=WORKERS, device=torch.device(device))


class _Epochs:
    """Calls that each pull one epoch of batches from a warmed-up stream."""

    def __init__(self, stream):
        self.stream, self.step = stream, 0
        self()  # warm-up: build the pipeline / start the workers

    def __call__(self):
        for _ in range(STEPS):
            x, _ = self.stream.batch(self.step)
            self.step += 1
        if x.is_cuda:
            torch.cuda.synchronize()


def _images_per_s(fn, rounds: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return rounds * STEPS * BATCH / (time.perf_counter() - start)


def test_bench_data_pil_dataloader(benchmark, folder):
    epochs = _Epochs(_stream("torch", folder))
    benchmark.pedantic(epochs, rounds=3, iterations=1)
    ips = STEPS * BATCH / benchmark.stats.stats.mean
    benchmark.extra_info.update(images_per_s=round(ips, 1), workers=WORKERS)
    print(f"\nPIL DataLoader ({WORKERS} workers): {ips:.0f} images/s")


@needs_dali
def test_bench_data_dali_cpu_vs_pil(benchmark, folder):
    """DALI CPU benchmarked; the PIL path timed in the same run, so the ratio compares like with like."""
    dali = _Epochs(_stream("dali", folder))
    benchmark.pedantic(dali, rounds=3, iterations=1)
    dali_ips = STEPS * BATCH / benchmark.stats.stats.mean
    pil_ips = _images_per_s(_Epochs(_stream("torch", folder)))
    ratio = dali_ips / pil_ips
    benchmark.extra_info.update(dali_images_per_s=round(dali_ips, 1), pil_images_per_s=round(pil_ips, 1),
                                dali_over_pil=round(ratio, 2), threads=WORKERS)
    print(f"\nDALI CPU ({WORKERS} threads): {dali_ips:.0f} images/s; PIL DataLoader ({WORKERS} workers): "
          f"{pil_ips:.0f} images/s; DALI/PIL = {ratio:.2f}x  ({N_IMAGES} images ~320x240 -> {SIZE}x{SIZE}, "
          f"batch {BATCH})")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bench_data_device_resident_step(benchmark, device):
    """Fashion-MNIST-sized uint8 set on the device: one step's batch (indices, flips, scaling), no host draws."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the device-resident step on a GPU is unmeasured here")
    images = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = DeviceImageDataset(images, torch.zeros(60000, dtype=torch.long), device)
    step = iter(range(1, 10**9))
    ds.batch(0, 256)  # draws epoch 0

    def one_step():
        x, _ = ds.batch(next(step) % 234, 256)  # stay inside epoch 0: the per-step cost, not the epoch's draw
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    benchmark(one_step)
    benchmark.extra_info.update(us_per_step=round(benchmark.stats.stats.mean * 1e6, 1), batch=256)
    print(f"\ndevice-resident batch of 256 on {device}: {benchmark.stats.stats.mean * 1e6:.0f} us/step")


@needs_dali
def test_bench_data_dali_mixed_vs_training_step(benchmark, folder):
    """GPU decoding ("mixed") beside the images/s one training step consumes at the same batch."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: DALI's 'mixed' decoder against the training step is unmeasured here")
    from fastsemdiff.config import load_config
    from fastsemdiff.models import SemanticDiffusion

    epochs = _Epochs(_stream("dali", folder, "cuda"))
    benchmark.pedantic(epochs, rounds=3, iterations=1)
    decode_ips = STEPS * BATCH / benchmark.stats.stats.mean
    cfg = load_config(None, [f"data.image_size={SIZE}", "data.channels=3", "model.patch_size=4", "model.preset=S"])
    model = SemanticDiffusion(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randn(BATCH, 3, SIZE, SIZE, device="cuda")

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(x, torch.Generator("cuda").manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        train_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        train_step()
    torch.cuda.synchronize()
    step_ips = 10 * BATCH / (time.perf_counter() - start)
    benchmark.extra_info.update(mixed_decode_images_per_s=round(decode_ips, 1), train_step_images_per_s=round(step_ips, 1))
    print(f"\nDALI mixed decode: {decode_ips:.0f} images/s; DiT-S/4 training step at batch {BATCH}: {step_ips:.0f} "
          f"images/s")
