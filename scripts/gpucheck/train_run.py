"""``python -m gpucheck.train_run [--fault mln-scale=1.03 | --fault mln-twopass] -- <fastsemdiff.train args>``:
one training run of the train-curves stage, with nothing planted (``fastsemdiff.train`` as it is) or with a
planted kernel, for the curve check's own test (tests/test_gpu_check.py).

Planted here, by monkeypatching, never in the library. Both replace the modulated LayerNorm that
``fastsemdiff.nn`` calls (``ModulatedLayerNorm``: each block's first norm and the final layer's), on the fused
path (``fastsemdiff.ops.modulated_layer_norm``) and on the torch path (``fastsemdiff.nn.norm``'s
``modulated_layer_norm_ref``) alike, so a run gets it whatever its backend:
- ``mln-scale=F``: a WRONG kernel, its output (and so its gradient) F times the correct one.
- ``mln-twopass``: a CORRECT kernel that rounds differently: mean and variance by two explicit passes in fp32
  instead of ``F.layer_norm``, as an independent fused kernel would compute them.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

FAULTS = ("mln-scale=FACTOR", "mln-twopass")


def _twopass(x, shift, scale, weight=None, bias=None, eps: float = 1e-6, rms: bool = False, *rest, **kwargs):
    """``norm(x) [* weight + bias] * (1 + scale) + shift``, the statistics by explicit passes in fp32."""
    import torch

    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    if rms:
        y = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)
    else:
        centred = xf - xf.mean(-1, keepdim=True)
        y = centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    per_token = (lambda m: m.unsqueeze(1) if m.dim() == 2 else m)
    return (y * (1 + per_token(scale).to(acc)) + per_token(shift).to(acc)).to(x.dtype)


def _replace(make: Callable[[Callable], Callable]) -> None:
    import fastsemdiff.nn.norm as norm
    import fastsemdiff.ops as ops

    ops.modulated_layer_norm = make(ops.modulated_layer_norm)
    norm.modulated_layer_norm_ref = make(norm.modulated_layer_norm_ref)


def plant(fault: str) -> None:
    name, _, value = fault.partition("=")
    if name == "mln-scale" and value:
        factor = float(value)
        _replace(lambda correct: (lambda *a, **k: correct(*a, **k) * factor))
    elif name == "mln-twopass" and not value:
        # the fused op's signature ends (..., eps, rms, backend, check): the extra two are ignored
        _replace(lambda correct: _twopass)
    else:
        raise SystemExit(f"unknown fault {fault!r}: expected one of {', '.join(FAULTS)}")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fault", action="append", default=[], help=", ".join(FAULTS))
    args = p.parse_args(argv[:split])
    for fault in args.fault:
        plant(fault)
    from fastsemdiff.train import main as train

    train(argv[split + 1:])


if __name__ == "__main__":
    main()
