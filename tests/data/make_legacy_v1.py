"""Writes tests/data/legacy-v1: a model exported and a checkpoint saved by fastsemdiff before
``model.pos_layout`` existed (rows in the first half of the position channels, no ``pos_embed`` entries).

Run with the package of commit 29a0d73 first on the path, e.g.
``git archive 29a0d73 fastsemdiff | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python tests/data/make_legacy_v1.py``.
The outputs are committed; tests only read them.
"""
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastsemdiff import checkpoint as ckpt
from fastsemdiff.config import load_config
from fastsemdiff.export import save_model
from fastsemdiff.models import SemanticDiffusion

OUT = Path(__file__).resolve().parent / "legacy-v1"
ARGS = ["model.hidden_size=16", "model.depth=1", "model.num_heads=2", "encoder.dim=8", "train.run_dir=."]

cfg = load_config(None, ARGS)
torch.manual_seed(0)
model = SemanticDiffusion(cfg)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
gen = torch.Generator().manual_seed(1)
x = torch.rand(8, 1, 28, 28, generator=gen) * 2 - 1
for _ in range(3):  # move every weight off its initial value (adaLN-Zero starts at zero)
    model(x, torch.Generator().manual_seed(2))[0].backward()
    optimizer.step()
    optimizer.zero_grad()
ema = {n: p.detach().clone() * 0.5 for n, p in model.named_parameters()}
save_model(model, cfg, OUT / "model.safetensors")
ckpt.save_checkpoint(OUT, 3, model, optimizer, ema, cfg, keep_last=1)

model.eval()
images = (torch.rand(4, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
t = torch.tensor([0.0, 0.3, 0.6, 0.9])
with torch.no_grad():
    z = model.embed(images, t)
    x_t = torch.rand(4, 1, 28, 28, generator=gen) * 2 - 1
    out = model.denoiser(x_t, t, z)
save_file({"images": images, "t": t, "z": z, "x_t": x_t, "denoised": out}, str(OUT / "expected.safetensors"))
print("wrote", OUT)
