"""bench/profile_step.py and bench/switch_matrix.py: how a profile is split into categories and gaps, and how the
matrix's rows are compared (the GPU figures come from scripts/gpu_check.py; these are the CPU-checkable parts)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import profile_step  # noqa: E402
import switch_matrix  # noqa: E402
from trainstep import TrainStep  # noqa: E402

from fastsemdiff.config import load_config  # noqa: E402


@pytest.mark.parametrize("names,cat", [
    (["aten::mm", "autograd::engine::evaluate_function: AddmmBackward0"], "matmul/conv"),
    (["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "aten::addmm"], "matmul/conv"),
    (["aten::bmm", "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention"], "attention"),
    (["flash_fwd_kernel", "aten::_flash_attention_forward"], "attention"),
    (["adaln_fwd_kernel", "fastsemdiff::modulated_norm_fwd"], "norm"),
    (["triton_per_fused_native_layer_norm_0", "CompiledFunction"], "norm"),
    (["multi_tensor_apply_kernel", "aten::_foreach_norm", "step.update"], "optimizer+ema"),
    (["aten::_foreach_lerp_", "step.update", "step.profiled"], "optimizer+ema"),
    (["vectorized_elementwise_kernel", "aten::gelu"], "other"),
    (["sm90_xmma_fprop_implicit_gemm", "aten::cudnn_convolution"], "matmul/conv"),
])
def test_categorize(names, cat):
    assert profile_step.categorize(names) == cat


def test_union_counts_overlaps_once():
    assert profile_step._union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert profile_step._union_us([]) == 0


def test_parse_variant():
    assert profile_step.parse_variant("epi:model.mlp_epilogue=addmm,train.update=loop") == (
        "epi", ["model.mlp_epilogue=addmm", "train.update=loop"])
    assert profile_step.parse_variant("plain") == ("plain", [])


def test_cpu_profile_of_a_step_splits_its_time():
    """A small step on the CPU: its matmuls, norm and update are found, and the parts stay within the span."""
    torch.manual_seed(0)
    cfg = load_config(None, ["train.update=foreach"])
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    x = torch.randn(128, 64)
    step = TrainStep(net, lambda gen: net(x).pow(2).mean(), cfg, torch.device("cpu"), 1, 128)
    step()
    p = profile_step.profile_one(step)
    cats = p["by_category_us"]
    assert p["source"].startswith("CPU op events")
    assert cats["matmul/conv"] > 0 and cats["norm"] > 0 and cats["optimizer+ema"] > 0 and cats["other"] > 0
    assert sum(cats.values()) + p["gaps_us"] == pytest.approx(max(p["span_us"], sum(cats.values())), rel=1e-6)
    assert step.annotate is False  # the phases are named only under the profiler


def test_matrix_ratios_are_to_each_sizes_first_row_and_tables_show_refusals():
    rows = [{"size": "XL2", "variant": "reference", "images_per_s": 500.0, "loss_last_quarter": 1.0, "batch": 128},
            {"size": "XL2", "variant": "addmm", "images_per_s": 550.0, "loss_last_quarter": 1.01, "batch": 128},
            {"size": "main", "variant": "main", "images_per_s": 3000.0, "loss_last_quarter": 0.5, "batch": 64},
            {"size": "XL2", "variant": "fp8", "skipped": "skipped: needs sm_89"}]
    switch_matrix.add_ratios(rows)
    assert rows[1]["ratio_to_reference"] == 1.1 and rows[1]["loss_rel_to_reference"] == pytest.approx(0.01)
    assert rows[2]["ratio_to_reference"] == 1.0 and rows[2]["reference"] == "main"
    md = switch_matrix.table(rows)
    assert "skipped: needs sm_89" in md and "1.10 (of reference)" in md


def test_matrix_plans_put_the_reference_first_and_refusals_in_the_dry_run():
    plan = switch_matrix.gpu_rows(["XL2", "main"])
    assert plan[0][:3] == ("XL2", "torch_compile", "reference (torch.compile)")
    assert [p[2] for p in plan if p[0] == "main"][:2] == ["main job (defaults)", "reduce-overhead"]
    assert not [p for p in plan if p[0] in ("B2", "S2")]
    assert {"B2", "S2"} <= {p[0] for p in switch_matrix.gpu_rows(["XL2", "main", "B2", "S2"])}
    dry = {p[2] for p in switch_matrix.dry_rows()}
    assert {"attention=cudnn", "fp8=rowwise", "reduce-overhead", "mlp_epilogue=addmm"} <= dry


def test_bench_steps_apply_the_switches_and_refuse_what_the_device_cannot_run():
    from trainstep import CPU_SIZES, build_step, main_job_step

    from fastsemdiff.config import ConfigError
    from fastsemdiff.nn import Attention, Mlp

    step = build_step("dit", CPU_SIZES["tiny"], "torch_eager", torch.device("cpu"),
                      ["model.attention=math", "model.mlp_epilogue=addmm", "train.update=loop"])
    assert {m.backend for m in step.module.modules() if isinstance(m, Attention)} == {"math"}
    assert {m.epilogue for m in step.module.modules() if isinstance(m, Mlp)} == {"addmm"}
    assert step.optimizer.defaults["foreach"] is False
    step()
    assert bool(step.finite) and len(step.losses) == 1
    with pytest.raises(ConfigError, match="cudnn"):
        build_step("dit", CPU_SIZES["tiny"], "torch_eager", torch.device("cpu"), ["model.attention=cudnn"])
    main = main_job_step(torch.device("cpu"), ["model.mlp_epilogue=addmm"], batch=4)
    assert main.batch == 4 and main.cfg.encoder.arch == "cnn" and main.flops > 0


def test_gpu_split_from_kernel_events():
    """The GPU branch on synthetic events: kernels are categorised one by one through their launching op's
    ancestry, gaps are the span minus the union of kernel intervals, and kernels linked to no op count as other."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def op(name, parent=None, kernels=()):
        return NS(name=name, cpu_parent=parent, device_type=DeviceType.CPU,
                  kernels=[NS(name=n, duration=d) for n, d in kernels])

    def kernel(start, end):
        return NS(name="k", device_type=DeviceType.CUDA, time_range=NS(start=start, end=end), kernels=[], cpu_parent=None)

    update = op("step.update")
    events = [op("aten::addmm", kernels=[("sm90_xmma_gemm", 40.0)]),
              op("aten::_flash_attention_forward", kernels=[("flash_fwd_kernel", 20.0)]),
              op("aten::_foreach_lerp_", update, kernels=[("multi_tensor_apply_kernel", 10.0)]),
              op("cudaGraphLaunch", kernels=[("triton_per_fused_native_layer_norm_0", 5.0), ("nvjet_tst_gemm", 5.0)]),
              kernel(0, 40), kernel(40, 60), kernel(70, 80), kernel(80, 85), kernel(85, 90), kernel(90, 95)]
    p = profile_step.split_events(events, on_gpu=True)
    cats = p["by_category_us"]
    assert cats == {"matmul/conv": 45.0, "attention": 20.0, "norm": 5.0, "other": 5.0, "optimizer+ema": 10.0}
    assert p["unattributed_us"] == 5.0  # 85 us of kernels, 80 attributed to ops
    assert p["span_us"] == 95 and p["busy_us"] == 85 and p["gaps_us"] == 10
