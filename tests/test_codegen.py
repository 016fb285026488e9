"""What the fused kernels compile to, on a CPU: every Triton kernel variant at the exact configuration its
launcher would launch on an sm_80 or sm_90 GPU (grid, num_warps, constexprs and the JIT's divisibility
specialisation of the real tensors), and every fastsemdiff._C kernel the dispatcher selects, read from the built
.so. At the DiT widths 384, 768, 1024, 1152 (and 100, not a multiple of 8) in bf16, fp16 and fp32:

* it compiles, with no stack frame or local memory (spills), except the accepted ones listed in
  bench/codegen.py's ACCEPTED_STACK with their reason;
* rows that are 16-byte aligned with C % 8 == 0 are read and written with 128-bit accesses (only a tile's row
  statistics and the vectors a backward program loads or stores once are 32/64-bit: ``allowed_scalars``);
* every Triton norm launch is at the config the launch table (kernels/adaln_configs.json) or its defaults give;
* its registers leave at least two resident blocks per SM.

The compiling runs once per module in a subprocess without the Triton interpreter (bench/codegen.py explains
why); the table in bench/RESULTS.md comes from the same rows (bench/codegen_table.py). bench/codegen.py is loaded
from the checkout by its path (it is not part of the package), and inspects the fastsemdiff under test: the
checkout, or .venv-gpu-image's installed copy under PYTHONSAFEPATH=1.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import REPO

pytest.importorskip("triton")


def _load_codegen():
    spec = importlib.util.spec_from_file_location("bench_codegen", REPO / "bench" / "codegen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module while the file executes
    spec.loader.exec_module(module)
    return module


codegen = _load_codegen()

pytestmark = pytest.mark.skipif(codegen.cuobjdump() is None,
                                reason="cuobjdump not found (it ships with triton in triton/backends/nvidia/bin)")


def _by_name(rows):
    return {(r["kernel"], r["variant"], r["width"], r["dtype"], r["arch"]): r for r in rows}


@pytest.fixture(scope="module")
def triton_rows():
    return codegen.run_in_subprocess("triton")


@pytest.fixture(scope="module")
def cuda_rows():
    if codegen.built_extension() is None:
        pytest.skip("fastsemdiff._C is not built here (no nvcc or no CUDA build of torch at install time)")
    return codegen.run_in_subprocess("cuda")


def _assert_clean(row):
    assert not row["problems"], f"{row['kernel']} {row['variant']} C={row['width']} {row['dtype']} " \
                                f"sm_{row['arch']}: {'; '.join(row['problems'])} ({row['access']})"


# ------------------------------------------------------------------------------------------------ Triton
def test_every_triton_variant_compiles_at_every_width_dtype_and_arch(triton_rows):
    got = {(r["kernel"], r["variant"], r["width"], r["dtype"], r["arch"]) for r in triton_rows}
    for arch in codegen.ARCHS:
        for C in codegen.WIDTHS:
            for dt in ("bfloat16", "float16", "float32"):
                for variant in ("ln+plain", "ln+residual"):
                    for kernel in ("_fwd_kernel", "_bwd_kernel"):
                        assert (kernel, variant, C, dt, arch) in got
        for variant in ("ln+plain+affine", "rms+plain", "rms+plain+affine", "ln+plain+per-token",
                        "ln+residual+affine", "rms+residual", "rms+residual+affine", "ln+residual+per-token"):
            for kernel in ("_fwd_kernel", "_bwd_kernel"):
                assert (kernel, variant, 1152, "bfloat16", arch) in got
        for dim in (codegen.FREQ_DIM, *codegen.WIDTHS):
            assert ("_timestep_embedding_kernel", "fp32 out", dim, "float32", arch) in got
    # the backward's second step, where the split gives a sample several programs (132 SMs, batch 256: S = 2)
    for variant in ("ln+plain per-sample sums", "ln+residual per-sample sums", "rms+plain+affine weight/bias sums"):
        assert ("_finish_kernel", variant, 1152, "bfloat16", 90) in got, variant


def test_triton_kernels_have_no_spills_and_two_blocks_per_sm_and_128_bit_rows(triton_rows):
    """Every row checked at once (one message per failure), so a regression names every variant it hits."""
    failures = [r for r in triton_rows if r["problems"]]
    assert not failures, "\n".join(
        f"{r['kernel']} {r['variant']} C={r['width']} {r['dtype']} sm_{r['arch']}: {'; '.join(r['problems'])} "
        f"({r['access']}, {r['regs']} regs x {r['threads']} threads)" for r in failures)
    assert all(r["stack"] == 0 and r["local"] == 0 for r in triton_rows
               if r["kernel"] != "_timestep_embedding_kernel" and "accepted" not in r["note"])


def test_aligned_rows_use_128_bit_loads_and_stores(triton_rows):
    """The rule the rows are checked by, stated directly for the norm kernels at the DiT widths: row data moves in
    128-bit accesses; the only narrower ones (32/64-bit) are a tile's row statistics and the vectors a backward
    program loads or stores once (its modulation row, its partial sums), at most SCALAR_ACCESSES of them."""
    for r in triton_rows:
        if r["kernel"] in ("_fwd_kernel", "_bwd_kernel", "_finish_kernel") and r["width"] in codegen.DIT_WIDTHS:
            if "weight/bias sums" in r["variant"]:  # a [C] vector once per backward: ACCEPTED_NARROW_VARIANT
                continue
            loads, stores = r["access"].split(" / ")
            assert "128x" in loads and "128x" in stores, r
            assert not any(f" {w}x" in f" {loads[3:]} {stores[3:]}" for w in (8, 16)), r
            narrow = sum(int(n) for w, n in (a.split("x") for a in f"{loads[3:]} {stores[3:]}".split()
                                              if a not in ("-",)) if w in ("32", "64"))
            assert narrow <= codegen.allowed_scalars(r["kernel"], r["config"].get("ROWS", 1)), r


def test_launches_use_the_table_or_default_configs(triton_rows):
    """Every norm launch compiled here is the one the launch table (or, where it has no entry, the default) gives
    for its device class, op, direction and width: so the rows above hold for the configs the GPU will run."""
    from fastsemdiff.kernels import adaln_config

    checked = 0
    for r in triton_rows:
        if r["kernel"] not in ("_fwd_kernel", "_bwd_kernel") or r["width"] not in (384, 768, 1152):
            continue
        op = "gated_residual_norm" if "residual" in r["variant"] else "modulated_norm"
        direction = "fwd" if r["kernel"] == "_fwd_kernel" else "bwd"
        cfg, _ = adaln_config.launch_config(op, direction, r["width"], f"sm_{r['arch']}")
        assert r["num_warps"] == cfg["warps"], r
        affine = "affine" in r["variant"] and direction == "bwd"
        assert r["config"]["ROWS"] == adaln_config.tile_rows(cfg, affine), r
        if direction == "bwd":
            assert r["config"]["NUM_STAGES"] == cfg["stages"], r
        checked += 1
    assert checked >= 2 * 2 * 3 * 3 * 2  # fwd/bwd x plain/residual x 3 widths x 3 dtypes x 2 archs


def test_the_jit_specialisation_is_the_real_one(triton_rows):
    """What the JIT derives from the tensors the ops layer passes: at a DiT width every pointer, stride and C
    is divisible by 16 (so the loads can be vectorised); at C=100 shift_mlp, the 4th chunk of the adaLN output
    (300 bf16 elements in), is not, while gate_msa (200 elements, 400 bytes) is."""
    rows = _by_name(triton_rows)
    aligned = rows[("_fwd_kernel", "ln+residual", 1152, "bfloat16", 90)]
    assert {"X", "H", "GATE", "SHIFT", "SCALE", "Y", "XOUT", "C", "stride_x", "stride_mod"} <= set(
        aligned["divisible_by_16"])
    odd = rows[("_fwd_kernel", "ln+residual", 100, "bfloat16", 90)]
    assert "C" not in odd["divisible_by_16"] and "SHIFT" not in odd["divisible_by_16"]
    assert "GATE" in odd["divisible_by_16"] and "SCALE" in odd["divisible_by_16"]
    assert "X" in odd["divisible_by_16"]  # the start of an allocation is aligned
    # the launch itself: one tile of ROWS rows per program forward; the backward grid is S programs per sample,
    # S a power of two with at most programs_per_sm programs per SM (batch 256 on 132 SMs: S = 2)
    from fastsemdiff.kernels import adaln_config

    assert aligned["grid"] == [256 * 256 // aligned["config"]["ROWS"]] and odd["num_warps"] >= 1
    cfg, _ = adaln_config.launch_config("gated_residual_norm", "bwd", 1152, "sm_90")
    bwd = rows[("_bwd_kernel", "ln+residual", 1152, "bfloat16", 90)]
    S, _ = adaln_config.programs_per_group(256, 256, cfg["rows"], codegen.SMS[90].sm_count, cfg)
    assert bwd["grid"] == [256 * S] and bwd["grid"][0] <= cfg["programs_per_sm"] * codegen.SMS[90].sm_count


# --------------------------------------------------------------------------------------- fastsemdiff._C
def test_every_selected_cuda_kernel_is_in_the_built_extension(cuda_rows):
    kernels = {(r["kernel"], r["arch"]) for r in cuda_rows}
    archs = sorted({r["arch"] for r in cuda_rows})  # .venv builds sm_80 and sm_90, .venv-gpu-image sm_90 only
    assert 90 in archs
    for arch in archs:
        for C in codegen.DIT_WIDTHS:
            for dt in codegen.DTYPES:
                for kernel, _ in codegen.cuda_selected(C, dt):
                    assert (kernel, arch) in kernels


def test_selected_cuda_kernels_have_no_stack_frame_and_128_bit_rows(cuda_rows):
    failures = [r for r in cuda_rows if r["problems"]]
    assert not failures, "\n".join(
        f"{r['kernel']} C={r['width']} {r['dtype']} sm_{r['arch']}: {'; '.join(r['problems'])}" for r in failures)
    norm = [r for r in cuda_rows if "adaln" in r["kernel"]]
    assert norm and all(r["stack"] == 0 and r["local"] == 0 for r in norm)


def test_rows_variant_cuda_kernels_are_checked(cuda_rows):
    """The rows variants (fastsemdiff.ops._cuda.FWD_VARIANTS / BWD_VARIANTS 1, 2) are among the kernels held to
    the rules above at every DiT width: no stack, 128-bit row accesses, at least two resident blocks per SM."""
    rows = [r for r in cuda_rows if r["arch"] == 90]
    for C in codegen.DIT_WIDTHS:
        for part in ("adaln_fwd_rows_kernel<", "adaln_bwd_rows_kernel<", codegen.CUDA_FINISH_KERNEL):
            found = [r for r in rows if part in r["kernel"] and r["width"] == C]
            assert found, (part, C)
            assert all(r["stack"] == 0 and r["local"] == 0 and r["blocks_per_sm"] >= 2 for r in found), found
    bwd = [r for r in rows if "adaln_bwd_rows_kernel<" in r["kernel"]]
    assert {r["kernel"].split(", ")[-1][:1] for r in bwd} == {"4", "2"}  # both tiles
    assert all(r["access"].startswith("ld 128x") for r in bwd)


def test_dispatcher_model_matches_the_cuda_source():
    """cuda_row_launch mirrors row_launch and the launch-bound choice in csrc/adaln.cu: check the source says so."""
    src = (codegen.Path(__file__).resolve().parents[1] / "csrc" / "adaln.cu").read_text()
    assert "(C / kElemsPerThread + kWarp - 1) / kWarp * kWarp" in src
    assert "cfg.threads_per_row <= 256 ? 256 : cfg.threads_per_row <= 512 ? 512 : 1024" in src
    assert codegen.cuda_row_launch(1152) == (160, 256) and codegen.cuda_row_launch(384) == (64, 256)
    assert codegen.cuda_row_launch(8192) == (1024, 1024)


def test_blocks_per_sm_counts_every_limit():
    assert codegen.blocks_per_sm(90, 32, 128) == 16  # threads: 2048 / 128
    assert codegen.blocks_per_sm(90, 128, 256) == 2  # registers: 65536 / (128 * 256)
    assert codegen.blocks_per_sm(90, 255, 256) == 1
    assert codegen.blocks_per_sm(80, 16, 32) == 32  # the block limit
    assert codegen.blocks_per_sm(80, 32, 128, shared=80 * 1024) == 2  # shared memory: 164 KiB / 81 KiB


def test_cuobjdump_is_parsed(tmp_path):
    """The SASS parser on known lines: 128-bit, 64-bit, 16-bit and scalar global accesses."""
    assert codegen._width(".E.128") == 128 and codegen._width(".E.64") == 64
    assert codegen._width(".E.U16") == 16 and codegen._width(".E") == 32
    code = codegen.FunctionCode("k", 90, loads={128: 3, 32: 2}, stores={128: 1})
    assert codegen.access_problems(code, torch.bfloat16, 2) == []
    code.stores[16] = 1
    assert codegen.access_problems(code, torch.bfloat16, 2) == ["stores of {16: 1} bits (width: count)"]
