"""Inputs the fastsemdiff._C ops must refuse on CUDA tensors, each with the message it must raise, run in a child
process so a crash (the first H200 run's segfault) fails one case by name instead of ending pytest.

``python tests/csrc_bad_inputs.py NAME...`` runs the named cases on the GPU, printing ``START name`` before each
call and a JSON line after it; :func:`run_isolated` (used by tests/test_csrc_cuda.py) starts it, and when the child
dies it records the case that was running as crashed and starts a new child for the rest.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

EPS = 1e-6


def _cases():
    """name -> (call, message regex). Built lazily: importing this module needs no GPU."""
    import torch

    from fastsemdiff.ops import _cuda

    ops, dev = _cuda.load(), torch.device("cuda")
    bf16 = torch.bfloat16

    def t(*shape, dtype=torch.float32, device=dev):
        return torch.randn(*shape, dtype=dtype, device=device)

    def mln(x, shift, scale, weight=None, bias=None, eps=EPS, tpm=3):
        return lambda: ops.mln_fwd(x(), shift(), scale(), weight() if weight else None, bias() if bias else None,
                                   eps, tpm, False)

    def bwd(dy, x, mean, rstd, scale, tpm=3):
        return lambda: ops.mln_bwd(dy(), x(), mean(), rstd(), scale(), None, None, tpm, False)

    x6 = lambda: t(6, 64)  # noqa: E731
    m2 = lambda: t(2, 64)  # noqa: E731
    stats = lambda: t(6).abs() + 1  # noqa: E731
    return {
        "C-not-multiple-of-8": (mln(lambda: t(6, 100), lambda: t(2, 100), lambda: t(2, 100)), "multiple of 8"),
        "C-above-row-limit": (mln(lambda: t(2, 8200), lambda: t(2, 8200), lambda: t(2, 8200), tpm=1), "row limit"),
        "C-zero": (mln(lambda: t(6, 0), lambda: t(2, 0), lambda: t(2, 0)), r"C=0 is not a positive multiple"),
        "x-3d": (mln(lambda: t(2, 3, 64), m2, m2), r"x must be \[M, C\]"),
        "x-fp64": (mln(lambda: t(6, 64, dtype=torch.float64), m2, m2), "float32, float16 or bfloat16"),
        "x-int": (mln(lambda: torch.ones(6, 64, dtype=torch.int32, device=dev), m2, m2), "float32, float16"),
        "misaligned-start": (mln(lambda: t(6, 72, dtype=bf16)[:, 4:68], lambda: t(2, 64, dtype=bf16),
                                 lambda: t(2, 64, dtype=bf16)), "16-byte aligned"),
        "misaligned-row-stride": (mln(lambda: t(6, 68, dtype=bf16)[:, :64], lambda: t(2, 64, dtype=bf16),
                                      lambda: t(2, 64, dtype=bf16)), "row stride of x"),
        "tokens-per-mod-row": (mln(x6, lambda: t(4, 64), lambda: t(4, 64), tpm=4), "tokens_per_mod_row=4"),
        "shift-rows": (mln(x6, lambda: t(3, 64), m2), r"shift must be \[2, 64\]"),
        "eps-nan": (mln(x6, m2, m2, eps=math.nan), "eps must be finite"),
        "shift-on-cpu": (mln(x6, lambda: t(2, 64, device="cpu"), m2), "shift is on cpu but x is on cuda"),
        "x-on-cpu": (mln(lambda: t(6, 64, device="cpu"), m2, m2), "shift is on cuda:0 but x is on cpu"),
        "weight-on-cpu": (mln(x6, m2, m2, weight=lambda: t(64, device="cpu")), "weight is on cpu"),
        "weight-shape": (mln(x6, m2, m2, weight=lambda: t(32)), r"weight must be \[64\]"),
        "bwd-mean-length": (bwd(x6, x6, lambda: t(5), stats, m2), "mean and rstd must be float32"),
        "bwd-dy-on-cpu": (bwd(lambda: t(6, 64, device="cpu"), x6, stats, stats, m2), "dy is on cpu"),
        "grmln-h-shape": (lambda: ops.grmln_fwd(x6(), t(6, 32), m2(), m2(), m2(), None, None, EPS, 3, False),
                          r"h must be \[6, 64\]"),
        "timestep-t-2d": (lambda: ops.timestep_embedding(t(3, 1), 8, 1e4), r"t must be \[B\]"),
        "timestep-max-period": (lambda: ops.timestep_embedding(t(3), 8, math.nan), "max_period must be finite"),
    }


NAMES = ["C-not-multiple-of-8", "C-above-row-limit", "C-zero", "x-3d", "x-fp64", "x-int", "misaligned-start",
         "misaligned-row-stride", "tokens-per-mod-row", "shift-rows", "eps-nan", "shift-on-cpu", "x-on-cpu",
         "weight-on-cpu", "weight-shape", "bwd-mean-length", "bwd-dy-on-cpu", "grmln-h-shape", "timestep-t-2d",
         "timestep-max-period"]


def message(name: str) -> str:
    """The regex the refusal of case ``name`` must match (needs the extension; no GPU work)."""
    return _cases()[name][1]


def main(names: list[str]) -> None:
    cases = _cases()
    for name in names:
        print(f"START {name}", flush=True)
        call, _ = cases[name]
        try:
            call()
            result = {"name": name, "result": "returned", "message": ""}
        except Exception as e:  # noqa: BLE001 - the type and message are the result
            result = {"name": name, "result": "raised", "type": type(e).__name__, "message": str(e)}
        print("RESULT " + json.dumps(result), flush=True)


def run_isolated(names: list[str] = NAMES, timeout: float = 300) -> dict[str, dict]:
    """Every case's result; a case that killed its child process is ``{"result": "crashed (exit code N)"}``."""
    results: dict[str, dict] = {}
    left = list(names)
    while left:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *left], capture_output=True, text=True,
                              timeout=timeout)
        running = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                running = line[6:]
            elif line.startswith("RESULT "):
                r = json.loads(line[7:])
                results[r["name"]] = r
                running = None
        if proc.returncode == 0 and not running:
            break
        if running is None:  # died before its first case
            for name in left:
                if name not in results:
                    results[name] = {"name": name, "result": f"child failed to start (exit code {proc.returncode})",
                                     "message": proc.stderr[-1000:]}
            break
        results[running] = {"name": running, "result": f"crashed (exit code {proc.returncode})",
                            "message": proc.stderr[-2000:]}
        left = left[left.index(running) + 1:]
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
