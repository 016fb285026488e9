"""torch.compile of each block against the whole loss: compile time (first steps) and step time.

``python bench/compile_scope.py [--preset tiny] [--batch 64] [--steps 30] [--device cpu]`` trains the
same model with ``train.compile_scope=blocks`` and ``=model`` (and eager), through the trainer's own step
(``forward_backward`` + ``apply_update``), and prints one line per scope. The first two steps hold the
compilation (and recompilations); then the three take turns step by step and the step time is the median.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from fastsemdiff import distributed
from fastsemdiff.config import load_config
from fastsemdiff.data import mix_seed
from fastsemdiff.models import SemanticDiffusion
from fastsemdiff.train import apply_update, forward_backward, make_optimizer


class Scope:
    """One model trained with one compile scope, stepped by the trainer's own functions."""

    def __init__(self, scope: str | None, args) -> None:
        cfg = load_config(None, [f"model.preset={args.preset}", f"train.batch_size={args.batch}",
                                 f"model.patch_size={args.patch}"])
        self.cfg, self.device = cfg, torch.device(args.device)
        torch.manual_seed(0)
        self.core = SemanticDiffusion(cfg).to(self.device)
        rt = distributed.Runtime(0, 1, 0, self.device, "single",
                                 torch.bfloat16 if self.device.type == "cuda" else None)
        self.model = distributed.wrap(self.core, rt, scope)
        self.params = [p for p in self.core.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, cfg, self.device)
        self.ema = [p.detach().clone() for p in self.params]
        self.autocast = (torch.autocast(self.device.type, dtype=rt.dtype) if rt.dtype
                         else contextlib.nullcontext())
        g = torch.Generator(self.device).manual_seed(0)
        self.x0 = torch.rand(args.batch, 1, 28, 28, device=self.device, generator=g) * 2 - 1
        self.labels = torch.zeros(args.batch, dtype=torch.long, device=self.device)
        self.n = 0

    def step(self) -> tuple[float, float]:
        """One training step; returns (seconds, loss)."""
        t0 = time.perf_counter()
        gen = torch.Generator(self.device).manual_seed(mix_seed(0, self.n, 0, 1))
        loss, _ = forward_backward(self.model, self.core, self.x0, self.labels, gen, 1, self.autocast)
        apply_update(self.params, self.opt, self.ema, self.n, self.cfg)
        value = float(loss)
        self.n += 1
        return time.perf_counter() - t0, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--patch", type=int, default=7)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"patch {args.patch}, batch {args.batch}, {args.steps} steps")
    scopes = {name: Scope(None if name == "eager" else name, args) for name in ("eager", "blocks", "model")}
    first = {name: sum(sc.step()[0] for _ in range(2)) for name, sc in scopes.items()}  # compiles here
    times: dict[str, list[float]] = {name: [] for name in scopes}
    losses: dict[str, float] = {}
    for _ in range(args.steps):  # the scopes take turns step by step, so a shared CPU's load hits them alike
        for name, sc in scopes.items():
            dt, losses[name] = sc.step()
            times[name].append(dt)
    for name in scopes:
        print(f"{name:7s} first two steps (compile) {first[name]:7.2f} s   step {statistics.median(times[name]) * 1e3:8.2f} ms"
              f" (median of {args.steps})   loss after {args.steps + 2} steps {losses[name]:.6f}", flush=True)


if __name__ == "__main__":
    main()
