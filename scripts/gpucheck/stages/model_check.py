"""The whole model (``SemanticDiffusion``, S preset, bf16 autocast) fused (``auto``) against torch: loss and
every gradient against an fp32 run of the reference, by the accuracy rule of the kernel tests (the fused error at
most twice the torch-bf16 error plus a floor); every first-use check of the kernels must pass. The comparison runs
in a subprocess (``python -m gpucheck.stages.model_check``) so a crash costs this stage only."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

from ..runner import PY, Check, Stage

NAME = "model-check"
ORDER = 31
PARALLEL = True
GRAD_FLOOR = 1e-3  # allowed gradient error (relative) = 2 x the torch-bf16 error + this
LOSS_FLOOR = 5e-3  # allowed loss error (relative) = 2 x the torch-bf16 error + this


def run(check: Check) -> Stage:
    s = Stage(NAME)
    check.record.update(grad_floor=GRAD_FLOOR, loss_floor=LOSS_FLOOR)
    result = check.work / "model-check.json"
    cmd = [PY, "-m", "gpucheck.stages.model_check", "--result", str(result), *(["--dry-run"] if check.dry_run else [])]
    rc, _ = check.run(s, cmd, check.box(120, 500), check.helper_env())
    if result.exists():
        s.details = json.loads(result.read_text())
    if rc == 0:
        s.status, s.reason = "passed", s.details.get("verdict", "")
    elif rc is not None and s.details.get("verdict"):
        s.reason = s.details["verdict"]
    return s


def model_check(dry_run: bool) -> dict:
    """Loss and gradients of the fused model against the reference."""
    import torch

    from fastsemdiff.config import load_config
    from fastsemdiff.models import SemanticDiffusion
    from fastsemdiff.ops import guard

    if dry_run:
        device, sizes, batch = torch.device("cpu"), ["model.hidden_size=32", "model.depth=2", "model.num_heads=2",
                                                     "encoder.dim=16"], 4
        fused, data = "triton", ["data.image_size=28", "data.channels=1", "model.patch_size=7"]
        guard.CHECKED_DEVICE_TYPES = ("cuda", "cpu")  # the interpreter's kernels are checked too
    else:
        device, sizes, batch = torch.device("cuda"), ["model.preset=S"], 32
        fused, data = "auto", ["data.image_size=32", "data.channels=4", "model.patch_size=2"]
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, *([1, 28, 28] if dry_run else [4, 32, 32]), generator=gen) * 2 - 1).to(device)

    def one(backend: str, bf16: bool) -> tuple[float, dict]:
        torch.manual_seed(0)
        cfg = load_config(None, [*sizes, *data, f"model.backend={backend}", "model.fused_check=error"])
        model = SemanticDiffusion(cfg).to(device)
        with torch.no_grad():  # away from adaLN-Zero's zeros, so every gradient is non-trivial
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(device) * 0.02)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type,
                                                                                              enabled=False)
        with ctx:
            loss, _ = model(x0, torch.Generator(device).manual_seed(1))
        loss.backward()
        return loss.item(), {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = one("torch", False)
    t_loss, t_grads = one("torch", True)
    f_loss, f_grads = one(fused, True)

    def rel(grads: dict) -> tuple[float, dict]:
        per = {n: ((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-30)).item() for n, g in grads.items()}
        total = (sum(((g - ref_grads[n]) ** 2).sum() for n, g in grads.items()) ** 0.5
                 / sum((g ** 2).sum() for g in ref_grads.values()) ** 0.5).item()
        return total, per

    t_total, t_per = rel(t_grads)
    f_total, f_per = rel(f_grads)
    worst = max(f_per, key=lambda n: f_per[n] / (2 * t_per[n] + GRAD_FLOOR))
    loss_ok = abs(f_loss - ref_loss) <= 2 * abs(t_loss - ref_loss) + LOSS_FLOOR * abs(ref_loss)
    grads_ok = set(f_grads) == set(ref_grads) and f_total <= 2 * t_total + GRAD_FLOOR
    verdicts = guard.verdicts()
    checks_ok = all(v is None for v in verdicts.values()) and (dry_run or len(verdicts) > 0)
    passed = loss_ok and grads_ok and checks_ok and math.isfinite(f_loss)
    verdict = (f"loss {f_loss:.6f} vs fp32 {ref_loss:.6f} (torch bf16 {t_loss:.6f}); gradient rel. error "
               f"{f_total:.2e} vs torch bf16 {t_total:.2e} (allowed {2 * t_total + GRAD_FLOOR:.2e}); "
               f"{len(verdicts)} first-use checks, {sum(v is not None for v in verdicts.values())} failed")
    return {"passed": passed, "verdict": verdict, "fused_backend": fused, "batch": batch,
            "loss": {"fp32_torch": ref_loss, "bf16_torch": t_loss, "bf16_fused": f_loss, "ok": loss_ok},
            "grad_rel_error": {"bf16_torch": t_total, "bf16_fused": f_total, "ok": grads_ok,
                               "worst_param": worst, "worst_fused": f_per[worst], "worst_torch": t_per[worst],
                               "params": len(f_grads)},
            "first_use_checks": {str(k): v for k, v in verdicts.items()}, "checks_ok": checks_ok}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="the model check, in its own process")
    p.add_argument("--result", required=True, help="where to write the JSON verdict")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    try:
        res = model_check(args.dry_run)
    except Exception as e:  # reported, not hidden: the stage fails with the reason
        res = {"passed": False, "verdict": f"{type(e).__name__}: {e}"}
    with open(args.result, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(res["verdict"])
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
