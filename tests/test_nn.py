"""DiT layers against hand-written formulas on random inputs (fp32 tight, bf16 loose)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from fastsemdiff.models import DiT, patchify
from fastsemdiff.nn import (
    AdaLNModulation,
    Attention,
    DiTBlock,
    FinalLayer,
    GatedResidual,
    GatedResidualModulatedNorm,
    ModulatedLayerNorm,
    PatchEmbed,
    TimestepEmbedder,
    resolve_backend,
    sincos_pos_embed_2d,
    timestep_embedding,
)

from helpers import gen

EPS = 1e-6


def rand(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def ln_by_hand(x: torch.Tensor, weight=None, bias=None, eps: float = EPS) -> torch.Tensor:
    """LayerNorm over the last dim with mean and biased variance computed explicitly."""
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def mod_ln_by_hand(x, shift, scale, weight=None, bias=None, eps: float = EPS):
    if shift.dim() == 2:  # per-sample -> broadcast over tokens
        shift, scale = shift[:, None], scale[:, None]
    return ln_by_hand(x, weight, bias, eps) * (1 + scale) + shift


def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


# ------------------------------------------------------------------------------------ ModulatedLayerNorm
MOD_SHAPES = ["BC", "B1C", "BNC"]


def _mod(kind: str, B: int, N: int, C: int, seed: int) -> torch.Tensor:
    shape = {"BC": (B, C), "B1C": (B, 1, C), "BNC": (B, N, C)}[kind]
    return rand(*shape, seed=seed, scale=0.5)


@pytest.mark.parametrize("C", [72, 1152, 100])
@pytest.mark.parametrize("kind", MOD_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_modulated_layer_norm_matches_hand_formula(C, kind, affine):
    B, N = 3, 5
    x = rand(B, N, C, seed=1, scale=2.0) + 0.7  # a non-zero mean, so the centring matters
    shift, scale = _mod(kind, B, N, C, seed=2), _mod(kind, B, N, C, seed=3)
    # per-sample values really differ, so a wrong broadcast cannot pass
    assert not torch.allclose(shift[0], shift[1]) and not torch.allclose(scale[1], scale[2])
    m = ModulatedLayerNorm(C, elementwise_affine=affine)
    w = b = None
    if affine:
        with torch.no_grad():
            m.weight.copy_(1 + rand(C, seed=4, scale=0.3))
            m.bias.copy_(rand(C, seed=5, scale=0.3))
        w, b = m.weight.detach().double(), m.bias.detach().double()
    out = m(x, shift, scale)
    assert out.dtype == torch.float32 and out.shape == (B, N, C)
    expected = mod_ln_by_hand(x.double(), shift.double(), scale.double(), w, b).float()
    assert_close(out, expected)


@pytest.mark.parametrize("kind", MOD_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_modulated_layer_norm_gradients(kind, affine):
    B, N, C = 3, 4, 72
    x = rand(B, N, C, seed=11, scale=1.5).requires_grad_()
    shift = _mod(kind, B, N, C, seed=12).requires_grad_()
    scale = _mod(kind, B, N, C, seed=13).requires_grad_()
    m = ModulatedLayerNorm(C, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.copy_(1 + rand(C, seed=14, scale=0.3))
            m.bias.copy_(rand(C, seed=15, scale=0.3))
    g_out = rand(B, N, C, seed=16)

    out = m(x, shift, scale)
    gx, gshift, gscale = torch.autograd.grad(out, (x, shift, scale), g_out)

    x2, shift2, scale2 = (t.detach().double().requires_grad_() for t in (x, shift, scale))
    w = m.weight.detach().double() if affine else None
    b = m.bias.detach().double() if affine else None
    ref = mod_ln_by_hand(x2, shift2, scale2, w, b)
    rx, rshift, rscale = torch.autograd.grad(ref, (x2, shift2, scale2), g_out.double())
    assert_close(gx, rx.float(), rtol=1e-5, atol=1e-5)
    assert_close(gshift, rshift.float(), rtol=1e-5, atol=1e-5)
    assert_close(gscale, rscale.float(), rtol=1e-5, atol=1e-5)
    assert gshift.shape == shift.shape and gscale.shape == scale.shape
    if affine:
        w2 = m.weight.detach().double().requires_grad_()
        ref_w = mod_ln_by_hand(x.detach().double(), shift.detach().double(), scale.detach().double(), w2, b)
        (rw,) = torch.autograd.grad(ref_w, (w2,), g_out.double())
        (gw,) = torch.autograd.grad(m(x, shift, scale), (m.weight,), g_out)
        assert_close(gw, rw.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MOD_SHAPES)
def test_gated_residual_modulated_norm_matches_hand_formula(kind):
    B, N, C = 3, 6, 100
    x, h = rand(B, N, C, seed=21), rand(B, N, C, seed=22)
    gate = _mod(kind, B, N, C, seed=23)
    shift, scale = _mod(kind, B, N, C, seed=24), _mod(kind, B, N, C, seed=25)
    x_out, y = GatedResidualModulatedNorm(C)(x, h, gate, shift, scale)
    g = gate[:, None] if gate.dim() == 2 else gate
    expected_x = (x.double() + g.double() * h.double())
    assert_close(x_out, expected_x.float())
    assert_close(y, mod_ln_by_hand(expected_x, shift.double(), scale.double()).float())
    # GatedResidual alone
    assert_close(GatedResidual()(x, h, gate), expected_x.float())


def test_modulated_layer_norm_bf16_close_to_fp32():
    B, N, C = 3, 16, 1152
    x = rand(B, N, C, seed=31, dtype=torch.bfloat16)
    shift = rand(B, C, seed=32, scale=0.5, dtype=torch.bfloat16)
    scale = rand(B, C, seed=33, scale=0.5, dtype=torch.bfloat16)
    out = ModulatedLayerNorm(C)(x, shift, scale)
    assert out.dtype == torch.bfloat16
    expected = mod_ln_by_hand(x.double(), shift.double(), scale.double())
    assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)
    h, gate = rand(B, N, C, seed=34, dtype=torch.bfloat16), rand(B, C, seed=35, dtype=torch.bfloat16)
    x_out, y = GatedResidualModulatedNorm(C)(x, h, gate, shift, scale)
    assert x_out.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    ex = x.double() + gate.double()[:, None] * h.double()
    assert_close(x_out.double(), ex, rtol=1e-2, atol=2e-2)
    assert_close(y.double(), mod_ln_by_hand(ex, shift.double(), scale.double()), rtol=1e-2, atol=3e-2)


# ------------------------------------------------------------------------------------------- DiTBlock
def test_dit_block_adaln_zero_is_identity_and_randomised_is_not():
    C, heads = 64, 4
    x, c = rand(3, 9, C, seed=41), rand(3, C, seed=42)
    block = DiTBlock(C, heads)
    block.adaLN_modulation.zero_()
    assert_close(block(x, c), x, rtol=0, atol=0)
    # the blocks as the DiT constructs them are adaLN-Zero too
    for adaln in ("stacked", "per_block"):
        dit = DiT(16, 4, 3, C, 2, heads, z_dim=8, adaln=adaln)
        for blk, mod in zip(dit.blocks, dit.block_modulations(c)):
            assert_close(blk(x, c, mod), x, rtol=0, atol=0)
    with torch.no_grad():
        block.adaLN_modulation[1].weight.normal_(0, 0.2, generator=gen(43))
        block.adaLN_modulation[1].bias.normal_(0, 0.2, generator=gen(44))
    out = block(x, c)
    assert out.shape == x.shape
    assert (out - x).abs().max() > 1e-2


def test_dit_block_matches_hand_composition():
    C, heads = 32, 2
    block = randomize_(DiTBlock(C, heads, mlp_ratio=2.0), std=0.1, seed=45)
    x, c = rand(2, 5, C, seed=46), rand(2, C, seed=47)
    m = torch.nn.functional.silu(c) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias
    sh1, sc1, g1, sh2, sc2, g2 = m.chunk(6, dim=-1)
    h = x + g1[:, None] * block.attn(mod_ln_by_hand(x, sh1, sc1))
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    mlp = lambda u: fc2(torch.nn.functional.gelu(fc1(u), approximate="tanh"))  # noqa: E731
    expected = h + g2[:, None] * mlp(mod_ln_by_hand(h, sh2, sc2))
    assert_close(block(x, c), expected, rtol=1e-5, atol=1e-5)


def test_dit_block_state_dict_keys_follow_dit():
    keys = set(DiTBlock(64, 4).state_dict())
    for k in ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
              "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight",
              "adaLN_modulation.1.bias"]:
        assert k in keys, k
    final = set(FinalLayer(64, 2, 4).state_dict())
    assert {"linear.weight", "linear.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"} <= final


def test_final_layer_shape_and_formula():
    C, p, out_ch = 48, 2, 3
    layer = randomize_(FinalLayer(C, p, out_ch), std=0.1, seed=51)
    x, c = rand(4, 16, C, seed=52), rand(4, C, seed=53)
    out = layer(x, c)
    assert out.shape == (4, 16, p * p * out_ch)
    shift, scale = (torch.nn.functional.silu(c) @ layer.adaLN_modulation[1].weight.T
                    + layer.adaLN_modulation[1].bias).chunk(2, dim=-1)
    assert_close(out, layer.linear(mod_ln_by_hand(x, shift, scale)), rtol=1e-5, atol=1e-5)


def test_adaln_modulation_chunks():
    mod = randomize_(AdaLNModulation(8, 3, cond_dim=5), seed=55)
    c = rand(2, 5, seed=56)
    parts = mod(c)
    assert len(parts) == 3 and all(p.shape == (2, 8) for p in parts)
    full = torch.nn.functional.silu(c) @ mod[1].weight.T + mod[1].bias
    assert_close(torch.cat(parts, dim=-1), full)
    mod.zero_()
    assert all(torch.count_nonzero(p) == 0 for p in mod(c))


# ------------------------------------------------------------------------------------------- Attention
def attention_by_hand(attn: Attention, x: torch.Tensor, qk_norm: bool) -> torch.Tensor:
    B, N, C = x.shape
    H = attn.num_heads
    D = C // H
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # [B, N, 3C], laid out (3, H, D)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, N, H, D).transpose(1, 2) for i in range(3))
    if qk_norm:
        q = ln_by_hand(q, attn.q_norm.weight, attn.q_norm.bias)
        k = ln_by_hand(k, attn.k_norm.weight, attn.k_norm.bias)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    w = torch.exp(scores - scores.amax(-1, keepdim=True))
    w = w / w.sum(-1, keepdim=True)
    out = (w @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_hand_softmax(qk_norm):
    C, H = 48, 4
    attn = randomize_(Attention(C, H, qk_norm=qk_norm), std=0.2, seed=61)
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.add_(1.0)
            attn.k_norm.weight.add_(1.0)
    x = rand(3, 7, C, seed=62)
    out = attn(x)
    with torch.no_grad():
        attn64 = Attention(C, H, qk_norm=qk_norm).double()
        attn64.load_state_dict({k: v.double() for k, v in attn.state_dict().items()})
        expected = attention_by_hand(attn64, x.double(), qk_norm).float()
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # attention really mixes tokens: changing one token changes the others' outputs
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert (attn(x2)[:, 1:] - out[:, 1:]).abs().max() > 1e-4


def test_attention_rejects_indivisible_width():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(50, 4)


# ------------------------------------------------------------------------------------------ PatchEmbed
def test_patch_embed_shape_and_conv_equals_patch_matmul():
    img, p, C, D = 16, 4, 3, 32
    pe = randomize_(PatchEmbed(img, p, C, D), std=0.1, seed=71)
    x = rand(2, C, img, img, seed=72)
    out = pe(x)
    assert out.shape == (2, (img // p) ** 2, D)
    # token r*g + c is the patch in row r, column c: the same order as patchify; no positions (DiT's
    # x_embedder is timm's PatchEmbed, the model adds its pos_embed)
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(D, -1)  # (p, q, c) order as in patchify
    expected = patchify(x, p) @ w.T + pe.proj.bias
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert set(pe.state_dict()) == {"proj.weight", "proj.bias"}


@pytest.mark.parametrize("layout", ["dit", "rows_first"])
def test_sincos_table_by_hand(layout):
    """dit (MAE's get_2d_sincos_pos_embed): the first D/2 channels encode the column, the last D/2 the row;
    rows_first (models saved before model.pos_layout): the other way round. Each half is [sin, cos]."""
    D, g = 16, 5
    table = sincos_pos_embed_2d(D, g, layout)
    q = D // 4
    for r, c in [(0, 0), (1, 3), (4, 2), (3, 0), (0, 4)]:
        tok = table[r * g + c].double().tolist()
        first, second = (c, r) if layout == "dit" else (r, c)
        for k in range(q):
            omega = 1.0 / 10000 ** (k / q)
            assert math.isclose(tok[k], math.sin(first * omega), abs_tol=1e-6)
            assert math.isclose(tok[q + k], math.cos(first * omega), abs_tol=1e-6)
            assert math.isclose(tok[2 * q + k], math.sin(second * omega), abs_tol=1e-6)
            assert math.isclose(tok[3 * q + k], math.cos(second * omega), abs_tol=1e-6)


def test_sincos_layouts_are_transposes_and_default_is_dit():
    D, g = 24, 6
    dit, old = sincos_pos_embed_2d(D, g), sincos_pos_embed_2d(D, g, "rows_first")
    assert torch.equal(dit, sincos_pos_embed_2d(D, g, "dit"))
    assert not torch.equal(dit, old)
    # the dit table at (r, c) is the rows_first table at (c, r)
    assert torch.equal(dit.view(g, g, D), old.view(g, g, D).transpose(0, 1))
    with pytest.raises(ValueError, match="rows_first"):
        sincos_pos_embed_2d(D, g, "cols")


def test_models_hold_pos_embed_as_dit_does():
    """A frozen top-level parameter [1, N, D] added after x_embedder, as facebookresearch/DiT's."""
    dit = DiT(15, 3, 2, 24, 1, 2, z_dim=4)
    assert dit.pos_embed.shape == (1, 25, 24) and not dit.pos_embed.requires_grad
    assert torch.equal(dit.pos_embed[0], sincos_pos_embed_2d(24, 5))
    assert "pos_embed" in dit.state_dict()
    old = DiT(15, 3, 2, 24, 1, 2, z_dim=4, pos_layout="rows_first")
    assert torch.equal(old.pos_embed[0], sincos_pos_embed_2d(24, 5, "rows_first"))


def test_patch_embed_rejects_wrong_shape_and_bad_patch():
    pe = PatchEmbed(16, 4, 3, 32)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        pe(rand(2, 1, 16, 16, seed=74))
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        pe(rand(2, 3, 12, 12, seed=75))
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        pe(rand(3, 16, 16, seed=76))
    with pytest.raises(ValueError, match="not divisible by patch size"):
        PatchEmbed(28, 5, 1, 32)


def test_sincos_table_rows_have_equal_norm_and_are_distinct():
    D, g = 64, 6
    table = sincos_pos_embed_2d(D, g)
    assert table.shape == (g * g, D) and table.dtype == torch.float32
    # each (sin, cos) pair has unit norm, so every row has norm sqrt(D / 2)
    assert_close(table.norm(dim=1), torch.full((g * g,), math.sqrt(D / 2)))
    dist = torch.cdist(table.double(), table.double())
    off = dist + torch.eye(g * g, dtype=torch.float64) * 1e9
    assert off.min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4)


# ----------------------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("dim", [8, 7, 256, 33])
def test_timestep_embedding_matches_formula(dim):
    t = torch.rand(5, generator=gen(81)) * 1000
    emb = timestep_embedding(t, dim)
    rows = emb.tolist()
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    half = dim // 2
    for i in range(5):
        for k in range(half):
            f = math.exp(-math.log(10000.0) * k / half)
            assert math.isclose(rows[i][k], math.cos(float(t[i]) * f), abs_tol=2e-4)
            assert math.isclose(rows[i][half + k], math.sin(float(t[i]) * f), abs_tol=2e-4)
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)


def test_timestep_embedder_shape_and_scaling():
    te = randomize_(TimestepEmbedder(40, frequency_embedding_size=32), std=0.1, seed=82)
    t = torch.rand(6, generator=gen(83))
    out = te(t)
    assert out.shape == (6, 40)
    expected = te.mlp(timestep_embedding(t * 1000.0, 32))
    assert_close(out, expected)
    assert (te(t + 0.01) - out).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------- backends
def test_unknown_backend_is_rejected():
    for make in [
        lambda: ModulatedLayerNorm(8, backend="cuda-magic"),
        lambda: GatedResidualModulatedNorm(8, backend="cuda-magic"),
        lambda: DiTBlock(8, 2, backend="cuda-magic"),
        lambda: FinalLayer(8, 2, 1, backend="cuda-magic"),
        lambda: TimestepEmbedder(8, backend="cuda-magic"),
        lambda: resolve_backend("cuda-magic", "modulated_layer_norm"),
    ]:
        with pytest.raises(ValueError, match="cuda-magic"):
            make()
    # the modulation and the residual have no kernels of their own, so no backend to choose
    for layer in (AdaLNModulation, GatedResidual):
        assert "backend" not in inspect.signature(layer).parameters
    assert resolve_backend("auto", "modulated_layer_norm") == "torch"
    assert resolve_backend("torch", "timestep_embedding") == "torch"
    # explicit torch backend gives the same numbers as auto
    x, s, c = rand(2, 3, 8, seed=91), rand(2, 8, seed=92), rand(2, 8, seed=93)
    assert_close(ModulatedLayerNorm(8, backend="torch")(x, s, c), ModulatedLayerNorm(8)(x, s, c))


# ------------------------------------------------------------------------------- stacked adaLN
def test_stacked_adaln_equals_per_block_modulations():
    """One product for all blocks gives each block exactly what its own AdaLNModulation would."""
    from fastsemdiff.nn import AdaLNModulation, StackedAdaLNModulation

    depth, C = 3, 24
    per_block = [AdaLNModulation(C, 6) for _ in range(depth)]
    stacked = StackedAdaLNModulation(depth, C, 6)
    with torch.no_grad():
        for i, m in enumerate(per_block):
            m[1].weight.normal_(0, 0.3, generator=gen(60 + i))
            m[1].bias.normal_(0, 0.3, generator=gen(70 + i))
        stacked.weight.copy_(torch.cat([m[1].weight for m in per_block]))
        stacked.bias.copy_(torch.cat([m[1].bias for m in per_block]))
    c = rand(4, C, seed=61)
    for got, m in zip(stacked(c), per_block):
        for a, b in zip(got, m(c)):
            assert a.shape == (4, C)
            assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("src,dst", [("per_block", "stacked"), ("stacked", "per_block")])
def test_adaln_layouts_load_into_each_other(src, dst):
    """A state dict of either layout loads into a model of the other (converted on load) and the two
    models compute the same function; the converter round-trips exactly."""
    from fastsemdiff.nn import convert_adaln_state_dict

    torch.manual_seed(0)
    a = DiT(16, 4, 3, 32, 3, 2, z_dim=8, adaln=src)
    with torch.no_grad():
        for name, p in a.named_parameters():
            if "adaLN" in name:
                p.normal_(0, 0.2, generator=gen(len(name)))
    b = DiT(16, 4, 3, 32, 3, 2, z_dim=8, adaln=dst)
    b.load_state_dict(a.state_dict())
    x, t, z = rand(2, 3, 16, 16, seed=62), torch.rand(2, generator=gen(63)), rand(2, 8, seed=64)
    assert_close(b(x, t, z), a(x, t, z), rtol=1e-5, atol=1e-6)
    sd = a.state_dict()
    other = "stacked" if src == "per_block" else "per_block"
    back = convert_adaln_state_dict(convert_adaln_state_dict(dict(sd), "", 3, other), "", 3, src)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert set(b.state_dict()) == set(convert_adaln_state_dict(dict(sd), "", 3, dst))


def test_block_without_own_modulation_needs_mod():
    block = DiTBlock(16, 2, modulation=False)
    assert block.adaLN_modulation is None
    with pytest.raises(ValueError, match="mod="):
        block(rand(1, 4, 16, seed=65), rand(1, 16, seed=66))


def test_ops_never_import_nn():
    """One direction: ``fastsemdiff.nn`` imports ``fastsemdiff.ops`` (the references live with their ops), never
    the reverse; an import of nn from ops would close the circle the op units were separated to break."""
    import ast

    from conftest import PACKAGE_ROOT

    found = []
    for path in sorted((PACKAGE_ROOT / "fastsemdiff" / "ops").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # "..nn", "..nn.norm", "fastsemdiff.nn...", and "from .. import nn" (module "..", name "nn": "...nn")
            found += [(path.name, t) for t in targets if t.startswith(("..nn", "fastsemdiff.nn")) or t == "...nn"]
    assert found == [], found
