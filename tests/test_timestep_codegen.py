"""The Triton timestep-embedding kernel, compiled for sm_90 on this CPU, computes its sine arguments with no
approximate instruction: the accuracy the interpreter cannot see.

Under the interpreter tl.exp is numpy's exact exp, so tests/test_kernel_timestep_embedding.py passes on a CPU;
on a GPU Triton lowers tl.exp to ``ex2.approx.f32`` (a multiply by log2(e) and the hardware's approximate
2^x), a few ulp off in each frequency. The argument is ``t * f`` with t up to 1000, so those ulp become an
absolute error of ~1e-4 in ``sin``/``cos`` (the first H200 run: 2.9x the fp32 reference's error). The kernel
now loads the frequencies torch computed (as the reference computes them), and its PTX may contain none of:

* ``ex2.approx``, ``lg2.approx``: approximate 2^x / log2 x (what tl.exp / tl.log lower to);
* ``sin.approx``, ``cos.approx``: the hardware sine/cosine, accurate only near [-pi, pi] (arguments here reach
  1000; libdevice's ``__nv_sinf``/``__nv_cosf`` reduce the argument exactly first and use none of these);
* ``rcp.approx``, ``rsqrt.approx``, ``sqrt.approx``, ``div.approx``, ``div.full``, ``tanh.approx``: approximate
  reciprocal, square root, division and tanh, none of which the embedding needs.

The compile runs in a subprocess without the Triton interpreter (fastsemdiff.codegen explains why).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

CODEGEN = Path(__file__).resolve().parents[1] / "bench" / "codegen.py"
_BUNDLED = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = pytest.mark.skipif(not (_BUNDLED.is_file() or shutil.which("cuobjdump")),
                                reason="cuobjdump not found (it ships with triton in triton/backends/nvidia/bin)")

BANNED = ("ex2.approx", "lg2.approx", "sin.approx", "cos.approx", "rcp.approx", "rsqrt.approx", "sqrt.approx",
          "div.approx", "div.full", "tanh.approx")
DIMS = (256, 257, 33)  # DiT's frequency size, odd and small widths
# bench/codegen.py (loaded by path, as tests/test_codegen.py does) compiles the launch the launcher would make
_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_codegen", %r)
codegen = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = codegen
spec.loader.exec_module(codegen)
print(json.dumps({dim: codegen.compile_launch(codegen.timestep_launch(dim, 90), 90).ptx for dim in %r}))
""" % (str(CODEGEN), DIMS)


def banned_instructions(ptx: str) -> list[str]:
    """The approximate instructions in a PTX listing (with their full opcode, e.g. ``ex2.approx.ftz.f32``)."""
    found = []
    for line in ptx.splitlines():
        code = line.split("//")[0]
        for op in BANNED:
            if m := re.search(rf"\b{re.escape(op)}[\w.]*", code):
                found.append(m.group(0))
    return found


@pytest.fixture(scope="module")
def timestep_ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(importlib.util.find_spec("fastsemdiff").origin).resolve().parents[1])  # this process's copy
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as tmp:  # not the checkout, which could shadow the fastsemdiff under test
        out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=tmp,
                             timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("dim", DIMS)
def test_timestep_kernel_has_no_approximate_instructions(timestep_ptx, dim):
    ptx = timestep_ptx[dim]
    assert ".entry _timestep_embedding_kernel" in ptx or "_timestep_embedding_kernel" in ptx
    found = banned_instructions(ptx)
    assert not found, f"timestep kernel (dim={dim}, sm_90) uses approximate instructions: {sorted(set(found))}"


def test_the_banned_list_is_read_from_real_ptx_lines():
    """The scan finds an instruction with its modifiers and ignores comments."""
    ptx = "\tex2.approx.ftz.f32 \t%f3, %f2;\n\t// sin.approx.f32 in a comment\n\tmul.f32 %f4, %f3, %f1;\n"
    assert banned_instructions(ptx) == ["ex2.approx.ftz.f32"]
