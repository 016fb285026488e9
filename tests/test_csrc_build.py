"""The CUDA C++ extension fastsemdiff._C (csrc/) on a CPU machine: it was built and loads, every op is registered
with its schema, the Meta kernels give each output's shape and dtype (what torch.compile traces with), and a
call on CPU tensors raises a clear error. Also setup.py's decision when no CUDA toolchain is there.

The extension tests skip, with the reason, only where the extension was not built (no nvcc or no CUDA build of
torch at install time); CI builds it (scripts/setup.sh), so they run there.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastsemdiff
from fastsemdiff.ops import _cuda

REPO = Path(__file__).resolve().parents[1]
BUILT = sorted(Path(fastsemdiff.__file__).parent.glob("_C*.so"))

SCHEMAS = {
    "mln_fwd": "fastsemdiff_C::mln_fwd(Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, "
               "float eps, int tokens_per_mod_row, bool rms) -> (Tensor y, Tensor mean, Tensor rstd)",
    "mln_bwd": "fastsemdiff_C::mln_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor scale, Tensor? weight, "
               "Tensor? bias, int tokens_per_mod_row, bool rms) -> (Tensor dx, Tensor dshift, Tensor dscale, "
               "Tensor dweight, Tensor dbias)",
    "grmln_fwd": "fastsemdiff_C::grmln_fwd(Tensor x, Tensor h, Tensor gate, Tensor shift, Tensor scale, "
                 "Tensor? weight, Tensor? bias, float eps, int tokens_per_mod_row, bool rms) -> (Tensor x_out, "
                 "Tensor y, Tensor mean, Tensor rstd)",
    "grmln_bwd": "fastsemdiff_C::grmln_bwd(Tensor dx_out, Tensor dy, Tensor x_out, Tensor h, Tensor gate, "
                 "Tensor mean, Tensor rstd, Tensor scale, Tensor? weight, Tensor? bias, int tokens_per_mod_row, "
                 "bool rms) -> (Tensor dx, Tensor dh, Tensor dgate, Tensor dshift, Tensor dscale, Tensor dweight, "
                 "Tensor dbias)",
    "timestep_embedding": "fastsemdiff_C::timestep_embedding(Tensor t, int dim, float max_period) -> Tensor",
}


@pytest.fixture(scope="module")
def ops():
    namespace = _cuda.load()
    if namespace is None:
        if BUILT:
            pytest.fail(f"{BUILT[0].name} is built but does not load: {_cuda.unavailable_reason()}")
        pytest.skip(_cuda.unavailable_reason())
    return namespace


def test_every_op_is_registered_with_its_schema(ops):
    assert set(SCHEMAS) == set(_cuda.OPS)
    for name, schema in SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == schema
    assert _cuda.available() and _cuda.unavailable_reason() is None


def _args(name: str, device: str, dtype=torch.bfloat16, B=3, N=5, C=64, per_token=False, affine=True):
    M, R = B * N, (B * N if per_token else B)
    tpm = M // R

    def t(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt, device=device) if device != "meta" else torch.empty(
            *shape, dtype=dt, device=device)

    w = t(C, dt=torch.float32) if affine else None
    b = t(C, dt=torch.float32) if affine else None
    stats = (t(M, dt=torch.float32), t(M, dt=torch.float32))
    return {
        "mln_fwd": (t(M, C), t(R, C), t(R, C), w, b, 1e-6, tpm, False),
        "mln_bwd": (t(M, C), t(M, C), *stats, t(R, C), w, b, tpm, False),
        "grmln_fwd": (t(M, C), t(M, C), t(R, C), t(R, C), t(R, C), w, b, 1e-6, tpm, True),
        "grmln_bwd": (t(M, C), t(M, C), t(M, C), t(M, C), t(R, C), *stats, t(R, C), w, b, tpm, True),
        "timestep_embedding": (t(B, dt=torch.float32), 33, 10000.0),
    }[name]


def test_norm_config_switch(ops):
    """norm_config (the CUDA norm kernels' variant switch; no tensors, so it runs anywhere) sets the variants
    process-wide and returns the previous ones; bad values are refused with the range."""
    initial = list(ops.norm_config(-1, -1, 0))
    ops.norm_config(*initial)
    with _cuda.norm_variants(1, 2, 3):
        assert list(ops.norm_config(1, 2, 3)) == [1, 2, 3]
    assert list(ops.norm_config(*initial)) == initial
    for args, match in [((2, 0, 0), "fwd_variant=2"), ((0, 3, 0), "bwd_variant=3"), ((0, -2, 0), "bwd_variant=-2"),
                        ((0, 0, 33), "blocks_per_sm=33")]:
        with pytest.raises(RuntimeError, match=match):
            ops.norm_config(*args)
    assert list(ops.norm_config(*initial)) == initial  # a refused call changes nothing
    # the CUDA tests run every variant
    assert {f for f, _ in _cuda.TEST_VARIANTS.values()} == set(_cuda.FWD_VARIANTS)
    assert {b for _, b in _cuda.TEST_VARIANTS.values()} == set(_cuda.BWD_VARIANTS)


@pytest.mark.parametrize("name", _cuda.OPS)
def test_cpu_tensors_raise_a_clear_error(ops, name):
    with pytest.raises(RuntimeError, match=r"CUDA tensors only.*backend='triton'"):
        getattr(ops, name)(*_args(name, "cpu"))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_meta_kernels_give_shapes_and_dtypes(ops, per_token, affine):
    B, N, C = 3, 5, 64
    M, R = B * N, (B * N if per_token else B)
    bf16, f32 = torch.bfloat16, torch.float32
    param = [(C,), f32] if affine else [(0,), f32]

    def sig(ts):
        return [[tuple(t.shape), t.dtype] for t in ts]

    def a(name):
        return _args(name, "meta", B=B, N=N, C=C, per_token=per_token, affine=affine)

    assert sig(ops.mln_fwd(*a("mln_fwd"))) == [[(M, C), bf16], [(M,), f32], [(M,), f32]]
    assert sig(ops.mln_bwd(*a("mln_bwd"))) == [[(M, C), bf16], [(R, C), bf16], [(R, C), bf16], param, param]
    assert sig(ops.grmln_fwd(*a("grmln_fwd"))) == [[(M, C), bf16], [(M, C), bf16], [(M,), f32], [(M,), f32]]
    assert sig(ops.grmln_bwd(*a("grmln_bwd"))) == [[(M, C), bf16], [(M, C), bf16], [(R, C), bf16], [(R, C), bf16],
                                                   [(R, C), bf16], param, param]
    assert sig([ops.timestep_embedding(*a("timestep_embedding"))]) == [[(B, 33), f32]]


def test_ops_trace_into_a_graph(ops):
    """make_fx with fake tensors (what torch.compile does) records the ops as single graph nodes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def block(x, h, gate, shift, scale):
        x_out, y, mean, rstd = ops.grmln_fwd(x, h, gate, shift, scale, None, None, 1e-6, 4, False)
        y2, _, _ = ops.mln_fwd(x_out, shift, scale, None, None, 1e-6, 4, True)
        return y + y2

    x = torch.empty(8, 16, device="meta")
    mods = [torch.empty(2, 16, device="meta") for _ in range(3)]
    graph = make_fx(block, tracing_mode="fake")(x, x, *mods)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert "fastsemdiff_C.grmln_fwd.default" in targets and "fastsemdiff_C.mln_fwd.default" in targets


# ------------------------------------------------------------------------------ setup.py without a toolchain
def _setup(env_updates: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_updates}
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_setup_without_nvcc_builds_nothing_and_says_why_in_one_line():
    run = _setup({"FASTSEMDIFF_BUILD_CUDA": "auto", "CUDA_HOME": "/nonexistent"})
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("fastsemdiff:")]
    assert lines == ["fastsemdiff: no CUDA extension built (CUDA_HOME=/nonexistent has no bin/nvcc); "
                     "the triton and torch backends serve"], run.stdout


def test_setup_insists_when_asked_to_build():
    run = _setup({"FASTSEMDIFF_BUILD_CUDA": "1", "CUDA_HOME": "/nonexistent"})
    assert run.returncode != 0
    assert "FASTSEMDIFF_BUILD_CUDA=1 but cannot build fastsemdiff._C: CUDA_HOME=/nonexistent has no bin/nvcc" in (
        run.stdout + run.stderr)


def test_setup_can_be_told_not_to_build():
    run = _setup({"FASTSEMDIFF_BUILD_CUDA": "0"})
    assert run.returncode == 0, run.stderr
    assert "fastsemdiff: no CUDA extension built (FASTSEMDIFF_BUILD_CUDA=0)" in run.stdout
