"""The training step's speed switches (fastsemdiff/levers.py): each one's plumbing into the model and trainer,
its numerics against the plain path, its config errors, and its refusal on a device that cannot run it."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

import fastsemdiff.train as train_mod
from fastsemdiff import levers
from fastsemdiff.config import ConfigError, load_config
from fastsemdiff.models import DiT, SemanticDiffusion
from fastsemdiff.nn import Attention, Mlp
from fastsemdiff.nn.attention import linear_gelu_tanh, set_attention_backend, set_mlp_epilogue

from conftest import train_args
from helpers import gen

CPU = torch.device("cpu")
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


# ------------------------------------------------------------------------------------------- config keys

@pytest.mark.parametrize("override", ["model.attention=flash3", "model.mlp_epilogue=on", "train.update=fast",
                                      "train.compile_mode=reduce_overhead", "train.fp8=e4m3"])
def test_bad_switch_values_name_key_and_choices(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match="choose one of") as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_switch_defaults_are_explicit_and_overridable():
    cfg = load_config()
    assert (cfg.model.attention, cfg.model.mlp_epilogue, cfg.train.update, cfg.train.compile_mode, cfg.train.fp8) \
        == ("auto", "off", "auto", "default", "off")
    cfg = load_config(None, ["model.attention=math", "model.mlp_epilogue=addmm", "train.update=loop",
                             "train.compile=on", "train.compile_mode=max-autotune-no-cudagraphs", "train.fp8=rowwise"])
    assert (cfg.model.attention, cfg.model.mlp_epilogue, cfg.train.update, cfg.train.compile_mode, cfg.train.fp8) \
        == ("math", "addmm", "loop", "max-autotune-no-cudagraphs", "rowwise")


def test_compile_mode_without_compile_is_a_config_error():
    with pytest.raises(ConfigError, match="train.compile=off"):
        load_config(None, ["train.compile=off", "train.compile_mode=reduce-overhead"])


# --------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("backend", ["math", "flash"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_sdpa_backend_matches_auto_forward_and_backward(backend, qk_norm):
    """On the CPU SDPA has a math and a flash kernel: each, forced, gives auto's output and gradients."""
    torch.manual_seed(0)
    ref = Attention(144, 2, qk_norm=qk_norm).double()  # head size 72, as DiT-XL's
    alt = Attention(144, 2, qk_norm=qk_norm).double()
    alt.load_state_dict(ref.state_dict())
    set_attention_backend(alt, backend)
    x = torch.randn(3, 16, 144, dtype=torch.float64, generator=gen(1))
    xr, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_a = ref(xr), alt(xa)
    torch.testing.assert_close(out_a, out_r)
    w = torch.randn_like(out_r)
    (out_r * w).sum().backward()
    (out_a * w).sum().backward()
    torch.testing.assert_close(xa.grad, xr.grad)
    torch.testing.assert_close(alt.qkv.weight.grad, ref.qkv.weight.grad)


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_sdpa_backend_the_cpu_lacks_is_refused_before_training(backend):
    with pytest.raises(ConfigError) as e:
        levers.check_attention(backend, CPU, 72, torch.float32)
    msg = str(e.value)
    assert f"model.attention={backend}" in msg and "cpu" in msg and "model.attention=auto" in msg


def test_flash_attn_package_refused_on_cpu_and_when_absent(monkeypatch):
    with pytest.raises(ConfigError, match="needs a CUDA GPU and bf16"):
        levers.check_attention("flash_attn", CPU, 72, torch.float32)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails as if not installed
    from fastsemdiff.nn.attention import flash_attn_func

    with pytest.raises(ImportError, match="pip install flash-attn"):
        flash_attn_func()


def test_set_attention_backend_reaches_encoder_and_denoiser():
    cfg = load_config(None, ["model.attention=math", "model.mlp_epilogue=addmm"])
    model = SemanticDiffusion(cfg)
    done = levers.apply_model_levers(model, cfg)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    assert done["attention"] == ("math", len(attn)) and len(attn) == len(model.encoder.blocks) + len(model.denoiser.blocks)
    assert all(m.backend == "math" for m in attn) and all(m.epilogue == "addmm" for m in mlps)
    assert done["mlp_epilogue"] == ("addmm", len(mlps))
    with pytest.raises(ValueError, match="unknown"):
        set_attention_backend(model, "fast")
    with pytest.raises(ValueError, match="unknown"):
        set_mlp_epilogue(model, "triton")


# ------------------------------------------------------------------------------------ the MLP's epilogue

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim,batch", [(72, 1), (72, 3), (128, 2)])
def test_mlp_epilogue_matches_plain_mlp_forward_and_backward(dtype, dim, batch):
    torch.manual_seed(dim)
    plain = Mlp(dim, 4 * dim).to(dtype)
    torch.nn.init.normal_(plain.fc1.bias, std=0.5)  # fresh, non-zero biases: the epilogue adds them
    fused = Mlp(dim, 4 * dim).to(dtype)
    fused.load_state_dict(plain.state_dict())
    fused.epilogue = "addmm"
    x = torch.randn(batch, 16, dim, dtype=dtype, generator=gen(dim + batch))
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yf = plain(xp), fused(xf)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(yf, yp, **tol)
    w = torch.randn_like(yp)
    (yp * w).sum().backward()
    (yf * w).sum().backward()
    torch.testing.assert_close(xf.grad, xp.grad, **tol)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        a, b = fused.get_parameter(name).grad, plain.get_parameter(name).grad
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def test_mlp_epilogue_gradcheck():
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen(3), requires_grad=True)
    w = torch.randn(10, 6, dtype=torch.float64, generator=gen(4), requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, generator=gen(5), requires_grad=True)
    assert torch.autograd.gradcheck(linear_gelu_tanh, (x, w, b))


def test_mlp_epilogue_under_bf16_autocast_stays_within_the_plain_paths_error():
    """Under autocast both paths compute the matmuls in bf16: their difference to fp64 stays within 2x the plain
    bf16 path's own (plus a floor)."""
    torch.manual_seed(1)
    plain = Mlp(72, 288)
    torch.nn.init.normal_(plain.fc1.bias, std=0.5)
    x = torch.randn(2, 16, 72, generator=gen(7))
    ref = plain.double()(x.double())
    plain.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain = plain(x)
        plain.epilogue = "addmm"
        y_fused = plain(x)
    assert y_fused.dtype == y_plain.dtype == torch.bfloat16
    err_plain = (y_plain.double() - ref).abs().max().item()
    err_fused = (y_fused.double() - ref).abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-3, (err_fused, err_plain)


def test_addmm_activation_on_cpu_is_exact_gelu_hence_the_unfused_cpu_forward():
    """Why ``_LinearGeluTanh`` does not call ``torch._addmm_activation`` on the CPU: there it is exact GELU (tanh on
    CUDA, cuBLASLt's epilogue), and it has no derivative. If torch changes either, this test says so."""
    a, w, b = torch.randn(4, 8, generator=gen(1)), torch.randn(16, 8, generator=gen(2)), torch.randn(16, generator=gen(3))
    pre = torch.addmm(b, a, w.t())
    out = torch._addmm_activation(b, a, w.t(), use_gelu=True)
    torch.testing.assert_close(out, F.gelu(pre))
    assert (out - F.gelu(pre, approximate="tanh")).abs().max() > 1e-5
    with pytest.raises(RuntimeError, match="derivative"):
        torch._addmm_activation(b, a.requires_grad_(), w.t(), use_gelu=True).sum().backward()


def test_switches_trace_under_dynamo():
    """The SDPA backend context and the epilogue's autograd.Function compile (aot_eager: the tracing, not
    inductor's code) and give eager's output and gradients."""
    torch.manual_seed(0)
    from fastsemdiff.nn import DiTBlock

    block = DiTBlock(72, 2, backend="torch")
    torch.nn.init.normal_(block.adaLN_modulation[1].weight, std=0.1)
    set_attention_backend(block, "math")
    set_mlp_epilogue(block, "addmm")
    x, c = torch.randn(2, 16, 72, generator=gen(1)), torch.randn(2, 72, generator=gen(2))
    eager = block(x, c)
    eager.sum().backward()
    g_eager = block.mlp.fc1.weight.grad.clone()
    block.zero_grad()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, c)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(block.mlp.fc1.weight.grad, g_eager)


# ------------------------------------------------------------------------------- optimizer and the EMA

def _steps(update: str, n: int = 3):
    cfg = load_config(None, [f"train.update={update}", "train.warmup_steps=1", "train.steps=5"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    params = list(model.parameters())
    opt = train_mod.make_optimizer(params, cfg, CPU)
    ema = [p.detach().clone() for p in params]
    for step in range(n):
        model(torch.randn(6, 8, generator=gen(step))).pow(2).mean().backward()
        train_mod.apply_update(params, opt, ema, step, cfg)
    return opt, params, ema


def test_update_implementations_agree():
    opt_f, p_f, e_f = _steps("foreach")
    assert opt_f.defaults["foreach"] is True and not opt_f.defaults["fused"]
    for impl in ("fused", "loop"):
        opt, p, e = _steps(impl)
        assert opt.defaults["fused" if impl == "fused" else "foreach"] is (impl == "fused")
        for a, b in zip(p + e, p_f + e_f):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_update_auto_is_fused_on_cuda_and_cpu_and_foreach_elsewhere():
    assert levers.update_impl("auto", torch.device("cuda")) == "fused"
    assert levers.update_impl("auto", CPU) == "fused"
    assert levers.update_impl("auto", torch.device("mps")) == "foreach"
    assert levers.update_impl("loop", torch.device("cuda")) == "loop"


def _without_fused_adamw(monkeypatch) -> None:
    """Make torch.optim.AdamW refuse ``fused=True``, as a torch without a fused kernel for the device does."""
    real = torch.optim.AdamW

    def no_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)


def test_update_auto_falls_back_to_foreach_where_the_cpu_has_no_fused_adamw(monkeypatch):
    _without_fused_adamw(monkeypatch)
    levers._has_fused_adamw.cache_clear()
    try:
        assert levers.update_impl("auto", CPU) == "foreach"
        assert levers.update_impl("auto", torch.device("cuda")) == "fused"
    finally:
        levers._has_fused_adamw.cache_clear()


def test_fused_update_refused_where_torch_has_no_fused_adamw(monkeypatch):
    levers.check_update("fused", CPU)  # the CPU has one in this torch
    _without_fused_adamw(monkeypatch)
    with pytest.raises(ConfigError, match="train.update=foreach"):
        levers.check_update("fused", CPU)


def test_ema_update_loop_equals_foreach():
    params = [torch.randn(5, generator=gen(i)) for i in range(3)]
    a = [torch.randn(5, generator=gen(10 + i)) for i in range(3)]
    b = [t.clone() for t in a]
    levers.ema_update_(a, params, 0.1, "foreach")
    levers.ema_update_(b, params, 0.1, "loop")
    for x, y, p in zip(a, b, params):
        torch.testing.assert_close(x, y)
    assert not torch.equal(a[0], params[0])


class _SyncCounter:
    """Records the ways a tensor's value can reach Python (each is a host sync for a GPU tensor), with the file
    that asked and whether the tensor was a host-resident step counter (torch.optim keeps ``state["step"]`` on
    the CPU unless fused or capturable: reading it waits for nothing)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        import traceback

        self.calls: list[tuple[str, str]] = []
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, _name=name, **kw):
                caller = traceback.extract_stack()[-2].filename
                self.calls.append((_name, "torch/optim" if "torch/optim" in caller else caller))
                return _real(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("update", ["foreach", "fused", "loop"])
def test_training_step_reads_no_tensor_value_on_the_host(monkeypatch, update):
    """forward + backward + apply_update + the loop's finite/loss bookkeeping, as fastsemdiff.train runs a step
    between two log lines: no value goes to Python, so on a GPU nothing waits (only the log branch converts)."""
    cfg = load_config(None, [f"train.update={update}", "model.mlp_epilogue=addmm", "model.attention=math"])
    torch.manual_seed(0)
    core = SemanticDiffusion(cfg)
    levers.apply_model_levers(core, cfg)
    from fastsemdiff import distributed

    rt = distributed.Runtime(0, 1, 0, CPU, "single", None)
    model = distributed.wrap(core, rt, None)
    params = [p for p in core.parameters() if p.requires_grad]
    opt = train_mod.make_optimizer(params, cfg, CPU)
    ema = [p.detach().clone() for p in params]
    x0, labels = torch.randn(8, 1, 28, 28, generator=gen(0)), torch.zeros(8, dtype=torch.long)
    finite, loss_sum = torch.ones((), dtype=torch.bool), torch.zeros(())
    import contextlib

    def one(step):
        nonlocal finite, loss_sum
        g = torch.Generator().manual_seed(step)
        loss, _ = train_mod.forward_backward(model, core, x0, labels, g, 1, contextlib.nullcontext())
        grad_norm = train_mod.apply_update(params, opt, ema, step, cfg)
        finite &= torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        loss_sum += loss.detach()

    one(0)  # the optimizer's state is created on the first step
    counter = _SyncCounter(monkeypatch)
    one(1), one(2)
    outside_optim = [c for c in counter.calls if c[1] != "torch/optim"]
    assert outside_optim == [], outside_optim
    if update == "fused":  # the fused AdamW keeps its step counter as a tensor: nothing at all
        assert counter.calls == []
    else:  # foreach/loop read each parameter's host-side step counter (CPU tensors: no device wait)
        assert all(s.device.type == "cpu" for s in (opt.state[p]["step"] for p in params))
        per_param = 2 if update == "foreach" else 1  # this torch's adam.py: per step, per parameter
        assert len(counter.calls) == 2 * per_param * len(params), len(counter.calls)
    assert bool(finite)  # the counter itself sees a conversion: it can fail
    assert counter.calls[-1][0] == "__bool__"


# ------------------------------------------------------------------------------------------ compile mode

def test_reduce_overhead_refused_off_cuda():
    cfg = load_config(None, ["train.compile=on", "train.compile_mode=reduce-overhead"])
    for compiling in (True, False):  # the device is the first reason, whatever else is set
        with pytest.raises(ConfigError, match="CUDA graphs.*cpu"):
            levers.check_compile_mode(cfg, CPU, compiling=compiling)
    levers.check_compile_mode(load_config(None, ["train.compile=on", "train.compile_mode=max-autotune-no-cudagraphs"]),
                              CPU, compiling=True)
    auto = load_config(None, ["train.compile_mode=max-autotune-no-cudagraphs"])  # compile=auto: off on a CPU
    with pytest.raises(ConfigError, match="train.compile=on"):
        levers.check_compile_mode(auto, CPU, compiling=False)


@pytest.fixture
def fresh_compile_check():
    """The toolchain check's cached answer cleared before and after, so a planted broken compiler's answer is
    never left for later tests, even when the test fails halfway."""
    levers.cpu_compile_error.cache_clear()
    yield
    levers.cpu_compile_error.cache_clear()


def test_cpu_compile_without_a_toolchain_is_a_clear_error(monkeypatch, fresh_compile_check):
    """No C++ compiler: refused before any data is read, naming the fix; the smoke test runs once per process."""
    calls = []

    def broken_compile(fn, **kwargs):
        calls.append(fn)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

    monkeypatch.setattr(torch, "compile", broken_compile)
    for _ in range(2):
        with pytest.raises(ConfigError, match="train.compile=on on a CPU.*InvalidCxxCompiler.*apt-get install g\\+\\+.*"
                                              "train.compile=off"):
            levers.check_compile_toolchain(CPU, compiling=True)
    assert len(calls) == 1
    levers.check_compile_toolchain(CPU, compiling=False)  # nothing compiled: nothing to check
    levers.check_compile_toolchain(torch.device("meta"), compiling=True)  # not a CPU: inductor's GPU path


def test_cpu_compile_with_a_toolchain_passes(fresh_compile_check):
    levers.check_compile_toolchain(CPU, compiling=True)  # this machine builds the tests' compiled steps
    assert levers.cpu_compile_error() is None


# ------------------------------------------------------------------------------------------------- FP8

def _meta_dit(preset: str) -> DiT:
    from fastsemdiff.config import PRESETS

    hidden, depth, heads = PRESETS[preset]
    with torch.device("meta"):
        return DiT(32, 2, 4, hidden, depth, heads, z_dim=128)


def test_fp8_filter_takes_the_block_token_matmuls_of_xl_only():
    xl = _meta_dit("XL")
    picked = [n for n, m in xl.named_modules() if levers.fp8_filter(m, n)]
    expected = {f"blocks.{i}.{s}" for i in range(28) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(picked) == expected
    assert not levers.fp8_filter(xl.adaLN_stack, "adaLN_stack")  # not a Linear, and one row per image
    assert not levers.fp8_filter(torch.nn.Linear(1152, 1152), "t_embedder.mlp.2")  # conditioning: outside blocks
    assert levers.fp8_filter(torch.nn.Linear(1152, 4608), "denoiser.blocks.3.mlp.fc1")  # nested names count
    assert not levers.fp8_filter(torch.nn.Linear(1032, 4608), "blocks.0.mlp.fc1")  # 1032 is no multiple of 16
    small = _meta_dit("S")
    assert not [n for n, m in small.named_modules() if levers.fp8_filter(m, n)]  # 384 < FP8_MIN_FEATURES


def test_fp8_refused_on_cpu_and_old_gpus_and_without_torchao(monkeypatch):
    with pytest.raises(ConfigError, match="compute capability 8.9") as e:
        levers.check_fp8("rowwise", CPU)
    assert "train.fp8=off" in str(e.value)
    levers.check_fp8("off", CPU)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(ConfigError, match="A100.*sm_80"):
        levers.check_fp8("tensorwise", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a))
    with pytest.raises(ConfigError, match="pip install torchao"):
        levers.check_fp8("rowwise", cuda)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install torchao)")
def test_fp8_conversion_swaps_exactly_the_filtered_linears_keeping_parameters():
    from torchao.float8.float8_linear import Float8Linear

    cfg = load_config(None, ["model.preset=XL", "model.patch_size=2", "data.image_size=32", "data.channels=4",
                             "train.fp8=rowwise"])
    with torch.device("meta"):
        model = SemanticDiffusion(cfg)
    before = {n: p for n, p in model.named_parameters()}
    done = levers.apply_model_levers(model, cfg)
    swapped = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert set(done["fp8"][1]) == swapped and len(swapped) == 4 * (28 + 14)  # denoiser and encoder blocks
    assert all(p is before[n] for n, p in model.named_parameters())


# ----------------------------------------------------------------------------------- the trainer's start

@pytest.mark.parametrize("overrides,fragments", [
    (["model.attention=efficient"], ["model.attention=efficient", "cpu"]),
    (["train.fp8=rowwise"], ["train.fp8=rowwise", "8.9"]),
    (["train.compile=on", "train.compile_mode=reduce-overhead"], ["reduce-overhead", "CUDA graphs", "cpu"]),
])
def test_trainer_refuses_before_reading_data(overrides, fragments, tmp_path, fake_fmnist, capsys):
    from test_train import _main_error

    msg = _main_error(capsys, train_args(tmp_path / "run", fake_fmnist, *overrides))
    for f in fragments:
        assert f in msg, msg
    assert not (tmp_path / "run").exists()


def test_trainer_runs_with_the_switches_set(tmp_path, fake_fmnist):
    run = tmp_path / "run"
    train_mod.main(train_args(run, fake_fmnist, "train.steps=3", "train.log_every=1", "model.attention=math",
                              "model.mlp_epilogue=addmm", "train.update=loop"))
    import json

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in lines)
    assert (run / "model.safetensors").exists()


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """distributed.wrap hands train.compile_mode to every block's compile (and to the whole-model compile)."""
    from fastsemdiff import distributed

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw.get("mode")))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: (seen.append(("model", kw.get("mode"))), m)[1])
    cfg = load_config()
    core = SemanticDiffusion(cfg)
    rt = distributed.Runtime(0, 1, 0, CPU, "single", None)
    distributed.wrap(core, rt, "blocks", compile_mode="max-autotune-no-cudagraphs")
    assert seen == ["max-autotune-no-cudagraphs"] * (len(core.encoder.blocks) + len(core.denoiser.blocks))
    seen.clear()
    distributed.wrap(core, rt, "model", compile_mode="default")
    assert seen == [("model", None)]


def test_mlp_epilogue_traces_under_autocast():
    """The autocast branch (cast to the autocast dtype, then autocast off around the Function) compiles whole."""
    torch.manual_seed(0)
    m = Mlp(72, 288)
    m.epilogue = "addmm"
    x = torch.randn(2, 16, 72, generator=gen(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = m(x)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)
    compiled.float().sum().backward()
    assert m.fc1.weight.grad.dtype == torch.float32 and m.fc1.weight.grad.abs().sum() > 0
