"""The denoiser as a drop-in for facebookresearch/DiT: a DiT state dict (DiT's key names, random weights)
loads with ``load_dit_state_dict`` and gives the output of a plain-PyTorch DiT forward written here from
the paper's equations (adaLN-Zero blocks, MAE's 2-D sin-cos positions), at odd sizes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from fastsemdiff.models import DiT, load_dit_state_dict

from helpers import gen

# odd sizes: a 5x5 grid of 3x3 patches, 3 channels, width 44 in 4 heads of 11, MLP ratio 2.5, 3 blocks
IMG, P, C, D, HEADS, DEPTH, RATIO, CLASSES = 15, 3, 3, 44, 4, 3, 2.5, 7
FREQ = 256  # DiT's frequency_embedding_size


# ------------------------------------------------------------------------- the reference, from equations
def ref_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE/DiT: token i = r * grid + c; channels [0, dim/2) encode the column c, [dim/2, dim) the row r,
    each as [sin(p w_k), cos(p w_k)] with w_k = 1 / 10000^(k / (dim/4))."""
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        w = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        a = pos[:, None] * w[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    idx = torch.arange(grid * grid, dtype=torch.float64)
    row, col = torch.div(idx, grid, rounding_mode="floor"), idx % grid
    return torch.cat([one_axis(col, dim // 2), one_axis(row, dim // 2)], dim=1)


def ref_dit_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DiT(x, t, y) for integer steps t and class labels y, straight from the equations."""
    out_ch = sd["final_layer.linear.weight"].shape[0] // (P * P)
    B, dt = x.shape[0], x.dtype
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = FREQ // 2  # DiT computes the sinusoid in float32, whatever the model's dtype
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([args.cos(), args.sin()], dim=-1).to(dt)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]

    def modulate(v, shift, scale):
        return F.layer_norm(v, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    for i in range(DEPTH):
        b = f"blocks.{i}."
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = F.linear(
            F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        a = modulate(h, s_msa, sc_msa)
        q, k, v = F.linear(a, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).view(
            B, -1, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // HEADS), dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, -1, D), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = h + g_msa[:, None] * att
        m = modulate(h, s_mlp, sc_mlp)
        m = F.gelu(F.linear(m, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + g_mlp[:, None] * F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = F.linear(modulate(h, shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g = IMG // P
    h = h.reshape(B, g, g, P, P, out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, out_ch, IMG, IMG)


def dit_state_dict(learn_sigma: bool, dtype=torch.float64, seed: int = 0, depth: int = DEPTH) -> dict:
    """A facebookresearch/DiT state dict with random weights (adaLN and final layer included, unlike an
    adaLN-Zero initialisation) and the fixed sin-cos positions."""
    g = gen(seed)
    out_ch = 2 * C if learn_sigma else C
    hid = int(D * RATIO)
    shapes = {"x_embedder.proj.weight": (D, C, P, P), "x_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, FREQ), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "y_embedder.embedding_table.weight": (CLASSES + 1, D),
              "final_layer.linear.weight": (P * P * out_ch, D), "final_layer.linear.bias": (P * P * out_ch,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                       b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "mlp.fc1.weight": (hid, D), b + "mlp.fc1.bias": (hid,),
                       b + "mlp.fc2.weight": (D, hid), b + "mlp.fc2.bias": (D,),
                       b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)})
    sd = {k: (torch.randn(s, generator=g, dtype=torch.float64) / math.sqrt(s[-1] if len(s) > 1 else 4)).to(dtype)
          for k, s in shapes.items()}
    sd["pos_embed"] = ref_pos_embed(D, IMG // P)[None].float().to(dtype)  # DiT stores the float32 table
    return sd


def ours(adaln: str, dtype=torch.float64, **kw) -> DiT:
    return DiT(IMG, P, C, D, DEPTH, HEADS, mlp_ratio=RATIO, z_dim=CLASSES + 1, backend="torch", adaln=adaln,
               **kw).to(dtype)


def inputs(dtype=torch.float64):
    x = torch.randn(4, C, IMG, IMG, generator=gen(11), dtype=torch.float64).to(dtype)
    steps = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([3, 0, CLASSES, 6])  # CLASSES: DiT's null class
    return x, steps, y


def run_ours(model: DiT, x, steps, y):
    """Our conditioning is t_emb + Linear(z): a one-hot z through a Linear holding DiT's label table is
    DiT's t_emb + y_emb. Our t is DiT's step / 1000."""
    z = F.one_hot(y, CLASSES + 1).to(x.dtype)
    return model(x, steps.to(x.dtype) / 1000, z)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("adaln", ["per_block", "stacked"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dit_checkpoint_gives_dits_output(adaln, learn_sigma):
    sd = dit_state_dict(learn_sigma)
    model = ours(adaln)
    unused = load_dit_state_dict(model, sd, drop_sigma=learn_sigma)
    assert unused == ["y_embedder.embedding_table.weight"]
    with torch.no_grad():
        model.z_embedder.weight.copy_(sd["y_embedder.embedding_table.weight"].T)
        model.z_embedder.bias.zero_()
    x, steps, y = inputs()
    expected = ref_dit_forward(sd, x, steps, y)[:, :C]  # learn_sigma: the first C channels are the mean
    got = run_ours(model, x, steps, y)
    tol = torch.finfo(torch.float64).eps ** 0.5
    assert expected.abs().max() > 0.1  # a real signal, not zeros
    assert_close(got, expected, rtol=tol, atol=tol)


def test_float32_within_float32_tolerance():
    sd = dit_state_dict(False, dtype=torch.float32)
    model = ours("stacked", torch.float32)
    load_dit_state_dict(model, sd)
    with torch.no_grad():
        model.z_embedder.weight.copy_(sd["y_embedder.embedding_table.weight"].T)
        model.z_embedder.bias.zero_()
    x, steps, y = inputs(torch.float32)
    ref = ref_dit_forward({k: v.double() for k, v in sd.items()}, x.double(), steps, y)
    tol = 100 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert_close(run_ours(model, x, steps, y).double(), ref, rtol=0, atol=tol)


def test_the_comparison_sees_transposed_positions():
    """The reference with the rows in the first half (the old layout) disagrees: the test can fail."""
    sd = dit_state_dict(False)
    x, steps, y = inputs()
    g = IMG // P
    transposed = dict(sd, pos_embed=sd["pos_embed"].view(1, g, g, D).transpose(1, 2).reshape(1, g * g, D))
    assert (ref_dit_forward(sd, x, steps, y) - ref_dit_forward(transposed, x, steps, y)).abs().max() > 1e-2
    assert torch.equal(ours("stacked").pos_embed.float(), sd["pos_embed"].float())  # ours is DiT's table
    with pytest.raises(ValueError, match="pos_layout='dit'"):
        load_dit_state_dict(ours("stacked", pos_layout="rows_first"), sd)


def test_state_dict_keys_are_dits():
    """With adaln=per_block and no z, the denoiser's keys are exactly DiT's, less its label embedding."""
    model = DiT(IMG, P, C, D, DEPTH, HEADS, mlp_ratio=RATIO, backend="torch", adaln="per_block")
    dit_keys = set(dit_state_dict(False)) - {"y_embedder.embedding_table.weight"}
    assert set(model.state_dict()) == dit_keys
    for k, v in model.state_dict().items():
        assert tuple(v.shape) == tuple(dit_state_dict(False)[k].shape), k


def test_z_parts_are_left_alone_and_module_prefix_is_accepted():
    model = ours("stacked")
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("z_embedder", "null_z"))}
    sd = {f"module.{k}": v for k, v in dit_state_dict(False).items()}  # as saved from a DDP wrapper
    load_dit_state_dict(model, sd)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.x_embedder.proj.weight, sd["module.x_embedder.proj.weight"])


def test_shape_mismatches_are_named():
    with pytest.raises(ValueError, match=r"learn_sigma.*drop_sigma=True"):
        load_dit_state_dict(ours("stacked"), dit_state_dict(True))
    with pytest.raises(ValueError, match=r"depth 2.*depth 3.*missing in the checkpoint: blocks\.2\."):
        load_dit_state_dict(ours("per_block"), dit_state_dict(False, depth=2))
    with pytest.raises(ValueError, match=r"not in the denoiser: blocks\.3\."):
        load_dit_state_dict(ours("per_block"), dit_state_dict(False, depth=4))
    wide = DiT(IMG, P, C, 48, DEPTH, HEADS, mlp_ratio=RATIO, z_dim=4, backend="torch")
    with pytest.raises(ValueError, match=r"hidden size 44.*hidden size 48.*shape differs: .*\[44, 44\] vs \[48, 48\]"):
        load_dit_state_dict(wide, dit_state_dict(False))
    with pytest.raises(ValueError, match="no facebookresearch/DiT keys"):
        load_dit_state_dict(ours("stacked"), {"ema": torch.zeros(1)})
