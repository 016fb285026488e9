"""SemanticDiffusion: the encoder and the denoiser joined by the diffusion process and one loss.

The denoiser can only remove the irreducible part of its error with information about x0 that comes
through z = E(x0, t), so the encoder learns what denoising at time t needs (DRL's argument), at every t.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..data.device_dataset import images_to_model_range
from ..diffusion import get_schedule, loss_weights, sample, target, to_x0_eps, train_times
from ..vae import codec_for
from .code_head import kl_to_standard_normal
from .dit import DiT
from .conv_encoder import ConvTimeEncoder
from .encoder import TimeEncoder

TimeArg = Union[float, torch.Tensor]


class StepNoise(NamedTuple):
    """Every random draw of one training loss, per sample (dim 0 is the batch).

    Drawn outside the model (``SemanticDiffusion.draw_noise``), so that the loss is a pure function of
    tensors: a micro-batch is a slice of its step's draws (gradient accumulation leaves the loss as it
    was) and the whole model traces under ``torch.compile`` (a ``torch.Generator`` argument does not).
    """

    t: torch.Tensor  # [B] diffusion times
    eps: torch.Tensor  # [B, C, H, W] Gaussian noise
    drop: torch.Tensor  # [B] bool: z replaced by the null embedding
    cons: Optional[torch.Tensor] = None  # [B] uniform in [-1, 1]: the consistency pass's t' - t / cons_step
    z_noise: Optional[torch.Tensor] = None  # [B, d] the variational encoder's sample of z_t
    z_noise2: Optional[torch.Tensor] = None  # [B, d] ... and of z_t'
    view: Optional[torch.Tensor] = None  # [B, 3] int: the encoder view's (dy, dx) shift and flip (0 | 1)
    crop: Optional[torch.Tensor] = None  # [B, 4] the encoder view's resized crop: (w, h, cx, cy), see cropped_view
    erase: Optional[torch.Tensor] = None  # [B, 5] the encoder view's erased box: (on, top, left, h, w), see erased_view
    # the second view of the invariance term (encoder.invariance_weight), drawn like view / crop / erase
    view_b: Optional[torch.Tensor] = None
    crop_b: Optional[torch.Tensor] = None
    erase_b: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None  # [B, N] bool: the denoiser's input tokens hidden (model.token_mask)

    def slice(self, start: int, stop: int) -> "StepNoise":
        return StepNoise(*(None if v is None else v[start:stop] for v in self))


NoiseArg = Union[StepNoise, torch.Generator, None]


def shifted_view(x: torch.Tensor, view: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image of x [B, C, H, W] moved by its (dy, dx) = view[:, :2] pixels (|dy|, |dx| <= pad; the
    uncovered border is the background, -1) and flipped left-right where view[:, 2] is 1."""
    B, _, H, W = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
        rows = (torch.arange(H, device=x.device) + pad)[None] - view[:, 0:1]  # [B, H]: output row i reads row i - dy
        cols = (torch.arange(W, device=x.device) + pad)[None] - view[:, 1:2]
        b = torch.arange(B, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = view[:, 2].bool()[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def cropped_view(x: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """Each image of x [B, C, H, W] cropped to the box crop[:, :4] = (w, h, cx, cy) and resized back to H x W
    (bilinear): w, h are the box's width and height as fractions of the image's, (cx, cy) its centre in the
    [-1, 1] coordinates of ``affine_grid`` (|cx| <= 1 - w keeps the box inside)."""
    B = x.shape[0]
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = crop[:, 0], crop[:, 1]
    theta[:, 0, 2], theta[:, 1, 2] = crop[:, 2], crop[:, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


ERASE_VALUE = 0.0  # torchvision's RandomErasing default: 0 in the normalised range ([-1, 1] here: mid-grey)


def erased_view(x: torch.Tensor, erase: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] with the box erase[:, 1:] = (top, left, h, w) (fractions of the side) set to ERASE_VALUE
    where erase[:, 0] is 1; a pixel is inside when its centre is."""
    _, _, H, W = x.shape
    rows = (torch.arange(H, device=x.device, dtype=x.dtype) + 0.5) / H
    cols = (torch.arange(W, device=x.device, dtype=x.dtype) + 0.5) / W
    top, left, h, w = (erase[:, k, None] for k in range(1, 5))
    inside_r = (rows[None] >= top) & (rows[None] < top + h)  # [B, H]
    inside_c = (cols[None] >= left) & (cols[None] < left + w)
    mask = inside_r[:, :, None] & inside_c[:, None, :] & erase[:, 0, None, None].bool()
    return torch.where(mask[:, None], torch.full_like(x, ERASE_VALUE), x)


_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # the random resized crop's aspect ratios (torchvision's)
_ERASE_AREA, _LOG_ERASE_RATIO = (0.02, 0.33), (math.log(0.3), math.log(3.3))  # RandomErasing's defaults


def draw_token_mask(B: int, tokens: int, hidden: int, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, tokens] bool with exactly ``hidden`` True per row, at positions drawn uniformly (MAE's shuffle)."""
    ranks = torch.rand(B, tokens, device=device, generator=generator).argsort(1).argsort(1)
    return ranks < hidden


def mask_to_pixels(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, N] token mask -> [B, 1, H, W] pixel mask, in unpatchify's row-major token order."""
    B, N = mask.shape
    g = math.isqrt(N)
    return mask.view(B, 1, g, 1, g, 1).expand(B, 1, g, patch, g, patch).reshape(B, 1, g * patch, g * patch)


def draw_crops(B: int, scale: Sequence[float], device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, 4] random resized crops (w, h, cx, cy): an area share in ``scale``, an aspect ratio in [3/4, 4/3]
    (sides clamped to the image rather than redrawn), a uniform position inside the image."""
    u = torch.rand(B, 4, device=device, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    ratio = torch.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[:, 1])
    w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    return torch.stack([w, h, (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)], 1)


def draw_erasures(B: int, p: float, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, 5] random erasures (on, top, left, h, w): on with probability p, RandomErasing's area and ratio."""
    u = torch.rand(B, 5, device=device, generator=generator)
    area = _ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * u[:, 1]
    ratio = torch.exp(_LOG_ERASE_RATIO[0] + (_LOG_ERASE_RATIO[1] - _LOG_ERASE_RATIO[0]) * u[:, 2])
    h, w = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    return torch.stack([(u[:, 0] < p).float(), (1 - h) * u[:, 3], (1 - w) * u[:, 4], h, w], 1)


def input_shape(cfg: Config) -> tuple[int, int]:
    """(channels, side) of the networks' input: the latent shape for data.source=latents, else the image's."""
    if cfg.data.source != "latents":
        return cfg.data.channels, cfg.data.image_size
    if not (cfg.latents.channels and cfg.latents.size):
        raise ConfigError(f"data.source=latents needs the latent shape, which comes from the manifest in "
                          f"{cfg.data.path}: build the model from the config after "
                          f"fastsemdiff.data.resolve_latents_config(cfg) (the trainer does this)")
    return cfg.latents.channels, cfg.latents.size


class SemanticDiffusion(nn.Module):
    """``adaln`` overrides the config's adaLN layout (the trainer picks per_block under FSDP); the weights
    of either layout load into either."""

    def __init__(self, cfg: Config, adaln: Optional[str] = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        m, e, d = cfg.model, cfg.encoder, cfg.data
        hidden, depth, heads = m.resolved()
        layout = adaln or m.adaln_layout()
        channels, side = input_shape(cfg)
        self.image_shape = (channels, side, side)  # what the networks see: pixels, or latents (data.source=latents)
        self.codec = codec_for(cfg)  # latents: the VAE between images and that space (not a submodule), else None
        if e.arch == "cnn":
            self.encoder = ConvTimeEncoder(
                channels, e.dim, hidden, e.conv_channels, e.conv_strides, e.pool_grid,
                time_conditioned=e.time_conditioned, residual_blocks=e.conv_residual_blocks, t_bins=e.t_bins,
                film_from=e.conv_film_from,
                normalize=e.normalize,
                variational=e.regularizer == "kl", kl_variance=e.kl_variance, backend=m.backend,
                fused_check=m.fused_check,
            )
        else:
            self.encoder = TimeEncoder(
                side, m.patch_size, channels, hidden, e.depth or max(1, depth // 2), heads, e.dim,
                mlp_ratio=m.mlp_ratio, time_conditioned=e.time_conditioned, normalize=e.normalize,
                variational=e.regularizer == "kl", qk_norm=m.qk_norm, backend=m.backend, adaln=layout,
                rms_norm=m.rms_norm, fused_check=m.fused_check, pos_layout=m.pos_layout, t_bins=e.t_bins,
                kl_variance=e.kl_variance,
            )
        self.denoiser = DiT(
            side, m.patch_size, channels, hidden, depth, heads, mlp_ratio=m.mlp_ratio, z_dim=e.dim,
            cond_merge=m.cond_merge, qk_norm=m.qk_norm, backend=m.backend, adaln=layout, rms_norm=m.rms_norm,
            fused_check=m.fused_check, pos_layout=m.pos_layout, mask_token=m.token_mask > 0,
        )
        self.schedule = get_schedule(cfg.diffusion.schedule)
        if e.invariance_weight > 0:  # the cross-view term's predictor, used in training only
            self.predictor = nn.Sequential(nn.Linear(e.dim, e.dim), nn.LayerNorm(e.dim), nn.GELU(),
                                           nn.Linear(e.dim, e.dim))
        if e.objective == "supervised":  # the ceiling baseline: the same encoder trained with labels
            self.classifier = nn.Linear(e.dim, e.num_classes)
            self.denoiser.requires_grad_(False)  # kept for a uniform model, but not trained

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ----------------------------------------------------------------------------------------- training
    def encoder_input(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                      view: Optional[torch.Tensor] = None, crop: Optional[torch.Tensor] = None,
                      erase: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What E reads: x0 (or x_t with ``encoder.input=noisy``), in the view training draws for it (a resized
        crop, then the shift and flip, then an erased box; each only when drawn), never in embeddings."""
        x = x0 if self.cfg.encoder.input == "clean" else self.schedule.add_noise(x0, t, eps)
        if crop is not None:
            x = cropped_view(x, crop)
        if view is not None:
            x = shifted_view(x, view, self.cfg.encoder.view_shift)
        return x if erase is None else erased_view(x, erase)

    def draw_noise(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> StepNoise:
        """The random draws of one loss on the batch ``x0`` (only those the config uses), from ``generator``."""
        cfg, B, dev = self.cfg, x0.shape[0], x0.device
        df = cfg.diffusion
        t = train_times(self.schedule, B, dev, generator, df.t_sampling, df.t_mean, df.t_std, df.t_shift)
        eps = torch.randn(x0.shape, device=dev, generator=generator)
        drop = torch.rand(B, device=dev, generator=generator) < cfg.model.z_dropout
        cons = z_noise = z_noise2 = None
        if cfg.encoder.objective != "supervised" and self._uses_consistency():
            cons = torch.rand(B, device=dev, generator=generator) * 2 - 1
        if cfg.encoder.regularizer == "kl":
            z_noise = torch.randn(B, cfg.encoder.dim, device=dev, generator=generator)
            if cons is not None:
                z_noise2 = torch.randn(B, cfg.encoder.dim, device=dev, generator=generator)
        view, crop, erase = self._draw_view(B, dev, generator)
        second = self._draw_view(B, dev, generator) if cfg.encoder.invariance_weight > 0 else (None, None, None)
        mask = None
        if cfg.model.token_mask > 0:  # the config refuses it with the supervised baseline
            side = self.image_shape[-1]
            mask = draw_token_mask(B, cfg.model.tokens(side), cfg.model.masked_tokens(side), dev, generator)
        return StepNoise(t, eps, drop, cons, z_noise, z_noise2, view, crop, erase, *second, mask=mask)

    def _draw_view(self, B: int, dev, generator: Optional[torch.Generator]) -> tuple[Optional[torch.Tensor], ...]:
        """(view, crop, erase): one draw of the encoder's view switches, None for each switch that is off."""
        e, view = self.cfg.encoder, None
        if e.view_shift or e.view_flip:
            shift = torch.randint(-e.view_shift, e.view_shift + 1, (B, 2), device=dev, generator=generator)
            flip = torch.randint(0, 2 if e.view_flip else 1, (B, 1), device=dev, generator=generator)
            view = torch.cat([shift, flip], 1)
        crop = draw_crops(B, e.view_crop_scale, dev, generator) if e.view_crop_scale else None
        erase = draw_erasures(B, e.view_erase, dev, generator) if e.view_erase > 0 else None
        return view, crop, erase

    def _uses_consistency(self) -> bool:
        e = self.cfg.encoder
        return self.cfg.diffusion.lambda_cons > 0 and (e.time_conditioned or e.input == "noisy")

    def _noise(self, x0: torch.Tensor, noise: NoiseArg) -> StepNoise:
        return noise if isinstance(noise, StepNoise) else self.draw_noise(x0, noise)

    def forward(self, x0: torch.Tensor, noise: NoiseArg = None, labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss (``forward`` so that FSDP and DDP wrap the whole step). ``noise`` is the step's
        ``StepNoise`` (or a generator to draw it from; ``generator=`` says the same). Labels are used only by
        the supervised baseline."""
        noise = generator if noise is None else noise
        if self.cfg.encoder.objective == "supervised":
            return self.supervised_loss(x0, labels, noise)
        return self.loss(x0, noise)

    def supervised_loss(self, x0: torch.Tensor, labels: Optional[torch.Tensor],
                        noise: NoiseArg = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of a linear head on z_t = E(x0, t) at a random t per sample: the same encoder and
        readout as the method, trained with labels instead of the denoiser (the probe's ceiling)."""
        if labels is None:
            raise ValueError("encoder.objective=supervised needs labels: the training data must be labelled")
        dev = x0.device
        n = self._noise(x0, noise)
        t, eps = n.t, n.eps
        z, _ = self.encoder(self.encoder_input(x0, t, eps, n.view, n.crop, n.erase), t, noise=n.z_noise)
        logits = self.classifier(z.to(self.classifier.weight.dtype))
        ce = F.cross_entropy(logits.float(), labels.to(dev).long())
        acc = (logits.argmax(-1) == labels.to(dev)).float().mean()
        return ce, {"ce": ce.detach(), "train_acc": acc.detach()}

    def loss(self, x0: torch.Tensor, noise: NoiseArg = None, generator: Optional[torch.Generator] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One self-conditional denoising loss on a batch x0 in [-1, 1] with the draws ``noise`` (a
        ``StepNoise``, or a generator to draw them from); returns (loss, detached parts)."""
        cfg, sch = self.cfg, self.schedule
        n = self._noise(x0, generator if noise is None else noise)
        t, eps = n.t, n.eps
        x_t = sch.add_noise(x0, t, eps)

        z, stats = self.encoder(self.encoder_input(x0, t, eps, n.view, n.crop, n.erase), t, noise=n.z_noise)
        if cfg.model.token_mask > 0 and n.mask is None:
            raise ValueError("model.token_mask > 0 needs StepNoise.mask: draw the noise with draw_noise")
        out = self.denoiser(x_t, t, z, n.drop, mask=n.mask)
        err = (out.float() - target(cfg.diffusion.prediction, sch, t, x0, eps)).pow(2)
        if n.mask is None:
            mse = err.mean()
            parts = {"mse": mse.detach()}
        else:  # hidden tokens: their eps is unknowable, so they are scored on x0, which only z can give at low t
            hidden = mask_to_pixels(n.mask, cfg.model.patch_size).expand_as(err)
            rec = (out.float() - x0.float()).pow(2)
            parts = {"mse": ((err * ~hidden).sum() / (~hidden).sum()).detach(),
                     "mask_x0": ((rec * hidden).sum() / hidden.sum()).detach()}
            err = torch.where(hidden, cfg.model.mask_loss_weight * rec, err)
            mse = err.mean()
        w = loss_weights(cfg.diffusion.loss_weight, sch, t, cfg.diffusion.prediction, cfg.diffusion.min_snr_gamma)
        loss = mse if w is None else (w * err.flatten(1).mean(1)).mean()

        if self._uses_consistency():
            if n.cons is None:
                raise ValueError("diffusion.lambda_cons > 0 needs StepNoise.cons: draw the noise with draw_noise")
            t2 = (t + n.cons * cfg.diffusion.cons_step).clamp(sch.t_min, sch.t_max)
            with torch.no_grad():
                z2, _ = self.encoder(self.encoder_input(x0, t2, eps, n.view, n.crop, n.erase), t2, noise=n.z_noise2)
            cons = (1 - F.cosine_similarity(z.float(), z2.float(), dim=-1)).mean()
            loss = loss + cfg.diffusion.lambda_cons * cons
            parts["cons"] = cons.detach()

        if cfg.encoder.invariance_weight > 0:
            inv = self.invariance(x0, t, eps, z, n)
            loss = loss + cfg.encoder.invariance_weight * inv
            parts["inv"] = inv.detach()

        reg = cfg.encoder.regularizer
        if reg == "l1":
            r = z.float().abs().sum(-1).mean()
        elif reg == "kl":
            r = kl_to_standard_normal(stats["mu"], stats["logvar"])
        if reg != "none":
            loss = loss + cfg.encoder.reg_weight * r
            parts["reg"] = r.detach()
        return loss, parts

    def invariance(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, z: torch.Tensor,
                   n: StepNoise) -> torch.Tensor:
        """1 - cos(predictor(z), sg(z_b)), z_b the code of the step's second view at the same t (its mean, for a
        variational encoder): one direction of SimSiam, without an EMA target (the denoising loss already keeps
        z from collapsing to a constant). The gradient reaches the encoder only through z."""
        if n.view_b is None and n.crop_b is None and n.erase_b is None:
            raise ValueError("encoder.invariance_weight > 0 needs the second view in StepNoise (view_b, crop_b, "
                             "erase_b): draw the noise with draw_noise")
        with torch.no_grad():
            z_b, _ = self.encoder(self.encoder_input(x0, t, eps, n.view_b, n.crop_b, n.erase_b), t, sample=False)
        p = self.predictor(z.to(self.predictor[0].weight.dtype))
        return (1 - F.cosine_similarity(p.float(), z_b.float(), dim=-1)).mean()

    # --------------------------------------------------------------------------------------- embeddings
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The network input for images (uint8 0..255 or float 0..1); for a model trained on latents, also for
        latents as the extraction stores them (float, the latent shape), taken as they are, while images (the
        VAE's image shape) are encoded through the recorded VAE first."""
        if self.codec is not None:
            shape = tuple(images.shape[1:]) if images.dim() == 4 else None
            if shape == self.image_shape and images.is_floating_point():
                return images.to(self.device, torch.float32)
            if shape == self.codec.image_shape:
                return self.codec.encode(images, self.device)
            c, h, w = self.image_shape
            ci, hi, wi = self.codec.image_shape
            raise ValueError(f"a model trained on latents embeds latents [B, {c}, {h}, {w}] (float, as "
                             f"python -m fastsemdiff.latents stores them) or images [B, {ci}, {hi}, {wi}] (uint8 "
                             f"0..255 or float 0..1, encoded through the VAE at {self.codec.path}); got "
                             f"{images.dtype} {list(images.shape)}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise ValueError(f"images must be [B, {c}, {h}, {w}] (uint8 0..255 or float 0..1), "
                             f"got {list(images.shape)}")
        return images_to_model_range(images.to(self.device))

    def _times(self, t: TimeArg, n: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        t = t.expand(n) if t.dim() == 0 else t
        if t.shape != (n,):
            raise ValueError(f"t must be a float or a [{n}] tensor, got shape {list(t.shape)}")
        if not ((t >= 0) & (t <= 1)).all():  # written so that NaN fails too
            raise ValueError("t is the diffusion time as a fraction in [0, 1] (0 = clean, 1 = pure noise)")
        return t

    def embedding_depends_on_t(self) -> bool:
        """False when z_t cannot change with t, so one embedding serves a whole grid of t: a static encoder
        on clean images, or an encoder whose t-modulation weights (adaLN, FiLM) are all zero (e.g. freshly
        initialised), where t reaches the encoder only through those weights."""
        if self.cfg.encoder.input == "noisy":
            return True  # x_t itself changes with t
        return self.encoder.depends_on_t()

    # What the probe found best, {"t": 0.9} or {"ts": [...]} (the run's readout.json; see fastsemdiff.load):
    # what ``embed(images)`` with no t returns. None: z at t = 0.
    readout: Optional[dict] = None

    @torch.no_grad()
    def embed(self, images: torch.Tensor, t: Optional[TimeArg] = None, batch_size: int = 1024) -> torch.Tensor:
        """z_t = E(x0, t) for images [B, C, H, W]; returns float32 [B, d] on the model's device. A model
        trained on latents takes images (encoded through its VAE) or stored latents (see ``_prepare``).

        With no t, the readout the probe found best for this model (``readout``): z at its best t, or the
        multi-t concatenation [B, len(ts) * d]; t = 0 for a model that was never probed. With
        ``encoder.input=noisy`` the noise comes from a fixed seed, so embeddings are repeatable.
        """
        if t is None:
            best = self.readout or {"t": 0.0}
            if "ts" in best:
                return self.embed_multi(images, best["ts"], batch_size)
            t = float(best["t"])
        x = self._prepare(images)
        t = self._times(t, x.shape[0])
        outs = []
        gen = torch.Generator(self.device).manual_seed(0)
        for i in range(0, x.shape[0], batch_size):
            x0, tb = x[i:i + batch_size], t[i:i + batch_size]
            eps = torch.randn(x0.shape, device=self.device, generator=gen)
            z, _ = self.encoder(self.encoder_input(x0, tb, eps), tb, sample=False)
            outs.append(z.float())
        return torch.cat(outs)

    def embed_multi(self, images: torch.Tensor, ts: Sequence[float], batch_size: int = 1024) -> torch.Tensor:
        """The sampled "infinite-dimensional" code: z at each t of ``ts`` concatenated, [B, len(ts) * d]."""
        return torch.cat([self.embed(images, float(t), batch_size) for t in ts], dim=-1)

    @torch.no_grad()
    def denoiser_features(self, images: torch.Tensor, t: float, block: int, seed: int = 0) -> torch.Tensor:
        """DDAE features: the unconditional denoiser's tokens after ``block``, mean-pooled, at time t."""
        x0 = self._prepare(images)
        tt = self._times(t, x0.shape[0])
        eps = torch.randn(x0.shape, device=self.device, generator=torch.Generator(self.device).manual_seed(seed))
        h = self.denoiser(self.schedule.add_noise(x0, tt, eps), tt, None, return_block=block)
        return h.mean(dim=1).float()

    # --------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, n: int, z: Optional[torch.Tensor] = None, steps: int = 50, sampler: str = "auto",
                 seed: int = 0) -> torch.Tensor:
        """Samples in [0, 1]: conditioned on z [n, d], or unconditional (the null embedding) when z is None."""
        if z is not None and z.shape[0] != n:
            raise ValueError(f"z has {z.shape[0]} rows for {n} samples")

        def denoise(x, t):
            out = self.denoiser(x, t, z).float()
            return to_x0_eps(self.cfg.diffusion.prediction, self.schedule, t, x, out)

        gen = torch.Generator(self.device).manual_seed(seed)
        x = sample(denoise, self.schedule, (n, *self.image_shape), steps, sampler, gen, self.device)
        if self.codec is not None:  # trained on latents: the sample is a latent, decoded through the VAE
            return self.codec.decode(x)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def as_images(self, x: torch.Tensor) -> torch.Tensor:
        """What a data split holds, as float images [B, C, H, W] in [0, 1] on the CPU, to show beside samples:
        pixels rescaled, stored latents decoded through the VAE."""
        if self.codec is not None and x.is_floating_point() and tuple(x.shape[1:]) == self.image_shape:
            return self.codec.decode(x.to(self.device, torch.float32)).cpu()
        return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).cpu()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, t: float = 0.0, steps: int = 50, seed: int = 0) -> torch.Tensor:
        """x0 -> z_t -> sample -> x0_hat: what the embedding keeps of the image."""
        z = self.embed(images, t)
        return self.generate(images.shape[0], z, steps, seed=seed)
