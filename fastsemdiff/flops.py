"""Model FLOPs of the DiT denoiser, the encoder and one training step, counted from the architecture.

Counted: the matrix products (a product of ``[m, k] @ [k, n]`` is ``2 m k n`` FLOPs); not counted:
normalisations, activations, softmax, residual adds and the optimizer (elementwise work, a few percent at
most). This is the "model FLOPs" of MFU (Chowdhery et al., PaLM appendix B): what the architecture needs,
whatever an implementation recomputes or fuses, so one count serves every implementation of a size.

Per sample, with width ``D``, ``N`` tokens, MLP width ``M = int(D * mlp_ratio)``, conditioning width ``D``:

    block      = qkv 6 N D^2 + scores and values 4 N^2 D + proj 2 N D^2 + MLP 4 N D M + adaLN 2 D (6 D)
               = 24 N D^2 + 4 N^2 D + 12 D^2                       (mlp_ratio 4)
    embed      = patch embed 2 N (p^2 C_in) D + timestep MLP 2 (F D + D^2)          (F = 256 frequencies)
    condition  = z embedder 2 d_z D (+ concat projection 2 (2 D) D)  when the DiT is conditioned on z
    final      = adaLN 2 D (2 D) + linear 2 N D (p^2 C_out)
    DiT        = embed + condition + depth * block + final
    encoder    = embed + depth_e * block + head 2 D d_z (x2 when variational)

Stacked adaLN (one product for all blocks) does the same FLOPs as DiT's per-block layout. A training step
is 3x the forward (the backward costs two products per forward product: input and weight gradients);
the joint step of ``SemanticDiffusion`` adds one forward of the encoder without gradient for the
consistency term: ``3 (DiT + encoder) + encoder``.

``PEAK_TFLOPS`` gives dense bf16 tensor-core peaks from public datasheets for MFU; on a CPU report achieved
FLOP/s against a matmul measured in the same run instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FREQ_DIM = 256  # TimestepEmbedder's sinusoid width (frequency_embedding_size)

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets. Matched against
# torch.cuda.get_device_name() in order: the first key contained in the name wins.
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.5,
    "H100 NVL": 835.5,
    "H100": 989.4,  # SXM5 (reports as "NVIDIA H100 80GB HBM3")
    "H200": 989.4,
    "A100": 312.0,
}


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU from its name, or None when the table does not know it."""
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


@dataclass(frozen=True)
class DiTShape:
    """What the FLOP count needs of a DiT-style stack."""

    hidden: int
    depth: int
    heads: int
    tokens: int
    patch: int
    in_channels: int
    out_channels: int
    mlp_ratio: float = 4.0


def block_flops(D: int, N: int, mlp_ratio: float = 4.0) -> int:
    """One adaLN-Zero DiT block's forward, per sample: 8 N D^2 + 4 N^2 D + 4 N D M + 12 D^2."""
    M = int(D * mlp_ratio)
    qkv = 2 * N * D * 3 * D
    attention = 2 * N * N * D + 2 * N * N * D  # q k^T over all heads, then softmax(.) v
    proj = 2 * N * D * D
    mlp = 2 * N * D * M + 2 * N * M * D
    adaln = 2 * D * 6 * D
    return qkv + attention + proj + mlp + adaln


def embed_flops(s: DiTShape) -> int:
    """Patch embedding (a strided convolution = one product per token) and the timestep MLP, per sample."""
    return 2 * s.tokens * s.patch * s.patch * s.in_channels * s.hidden + 2 * (FREQ_DIM * s.hidden + s.hidden ** 2)


def dit_forward_flops(s: DiTShape, z_dim: Optional[int] = None, cond_merge: str = "add") -> int:
    """``fastsemdiff.models.DiT`` forward FLOPs per sample (see the module docstring)."""
    D = s.hidden
    cond = 0
    if z_dim:
        cond = 2 * z_dim * D + (2 * 2 * D * D if cond_merge == "concat" else 0)
    final = 2 * D * 2 * D + 2 * s.tokens * D * s.patch * s.patch * s.out_channels
    return embed_flops(s) + cond + s.depth * block_flops(D, s.tokens, s.mlp_ratio) + final


def encoder_forward_flops(s: DiTShape, out_dim: int, variational: bool = False, time_conditioned: bool = True) -> int:
    """``TimeEncoder`` forward FLOPs per sample: embeddings, ``s.depth`` blocks, the head."""
    emb = embed_flops(s) if time_conditioned else 2 * s.tokens * s.patch * s.patch * s.in_channels * s.hidden
    return emb + s.depth * block_flops(s.hidden, s.tokens, s.mlp_ratio) + 2 * s.hidden * out_dim * (2 if variational else 1)


def dit_train_flops(s: DiTShape, z_dim: Optional[int] = None, cond_merge: str = "add") -> int:
    """One training step of the DiT alone, per sample: 3x the forward."""
    return 3 * dit_forward_flops(s, z_dim, cond_merge)


def semantic_shapes(cfg) -> tuple[DiTShape, DiTShape]:
    """(denoiser, encoder) shapes of ``SemanticDiffusion(cfg)``."""
    m, d = cfg.model, cfg.data
    hidden, depth, heads = m.resolved()
    tokens = (d.image_size // m.patch_size) ** 2
    den = DiTShape(hidden, depth, heads, tokens, m.patch_size, d.channels, d.channels, m.mlp_ratio)
    enc_depth = cfg.encoder.depth or max(1, depth // 2)
    enc = DiTShape(hidden, enc_depth, heads, tokens, m.patch_size, d.channels, d.channels, m.mlp_ratio)
    return den, enc


def semantic_train_flops(cfg) -> int:
    """One training step of ``SemanticDiffusion`` (encoder + denoiser, the default self-conditional
    objective), per sample:
    ``3 (DiT + encoder)``, plus one encoder forward without gradient when the consistency term is on."""
    e = cfg.encoder
    if getattr(e, "objective", "self_conditional") != "self_conditional":
        raise ValueError(f"semantic_train_flops counts the self-conditional objective, not {e.objective!r}")
    den, enc = semantic_shapes(cfg)
    dit = dit_forward_flops(den, e.dim, cfg.model.cond_merge)
    encoder = encoder_forward_flops(enc, e.dim, e.regularizer == "kl", e.time_conditioned)
    needs_cons = cfg.diffusion.lambda_cons > 0 and (e.time_conditioned or e.input == "noisy")
    return 3 * (dit + encoder) + (encoder if needs_cons else 0)
