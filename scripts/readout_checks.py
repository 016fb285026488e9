"""Checks of the probe's own choices on a trained run (docs/ABLATIONS.md, "Issue 22 at 7,000 steps").

    python scripts/readout_checks.py best-t RUN        # per t: held-out linear / kNN / 1,000-label top-1
    python scripts/readout_checks.py label-decay RUN   # few-label probes: fixed decay 1e-4 against 5-fold CV
    python scripts/readout_checks.py full-decay RUN    # full linear probe at several decays, held-out and test
    python scripts/readout_checks.py grids RUN         # every 3-t multi-t grid: held-out and test linear
    python scripts/readout_checks.py iterations RUN    # full linear probe at more L-BFGS iterations: converged?
    python scripts/readout_checks.py weights RUN       # multi-t linear from the EMA, the raw weights, two EMAs' mean
    python scripts/readout_checks.py similarity RUN    # how much of z at one t a linear map of z at another predicts
    python scripts/readout_checks.py variance RUN      # a KL run's log-variance per t: how much of it changes per image
    python scripts/readout_checks.py equal-width RUN   # readouts no wider than --width: z per t, its mean over t,
                                                       # the multi-t code by PCA, grids of narrow codes
    python scripts/readout_checks.py few-label RUN     # the report's few-label probes of z at the five t and at
                                                       # the multi-t grid (the latter: the report's own figures)
    python scripts/readout_checks.py wide RUN          # the goal's readouts (--width, default 1024): z at more
                                                       # t, z with the denoiser's pooled tokens
    python scripts/readout_checks.py draws RUN         # the 100-label leads over the controls from --draws draws
                                                       # (default 20): a margin told from the draws' noise
    python scripts/readout_checks.py narrow RUN        # readouts of z's width with 100 labels: z per t, z averaged
                                                       # over t, the pooled map

"Held-out" is the probe's own split of the training images (``eval._held_out_split``: fit on 10,000, scored on
a sixth of the split), so nothing here chooses on the test split; the test figures are printed beside the
held-out ones to show whether a choice carries over. ``--t`` is the best t of the run (label-decay); the
random-conv controls are the report's, at 128 and 384 dimensions.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastsemdiff import baselines  # noqa: E402
from fastsemdiff import eval as ev  # noqa: E402
from fastsemdiff.models.code_head import kl_to_standard_normal  # noqa: E402
from fastsemdiff.probe import class_balanced_subset, choose_probe_settings, knn_accuracy, linear_probe  # noqa: E402

TS = (0.0, 0.25, 0.5, 0.75, 1.0)
MULTI_TS = (0.0, 0.5, 1.0)
READS_CONTROLS = ("label-decay", "full-decay", "iterations", "draws")  # the checks that probe ``feats``
SIMILARITY_PAIRS = ((0.0, 0.5), (0.5, 1.0), (0.0, 1.0), (1.0, 0.0))  # (from t, to t)


def held_out_and_test(a, b, ytr, yte, fit, val, **probe) -> tuple[float, float]:
    """The linear probe of train features ``a``: fitted on ``fit`` and scored on ``val`` (both of the train
    split), then fitted on the whole train split and scored on the test features ``b``."""
    held = linear_probe(a[fit], ytr[fit], a[val], ytr[val], num_classes=10, **probe)["top1"]
    return held, linear_probe(a, ytr, b, yte, num_classes=10, **probe)["top1"]


def best_t(z, ytr, fit, val, **_) -> None:
    for t in TS:
        zf, zv, yf, yv = z[t][0][fit], z[t][0][val], ytr[fit], ytr[val]
        few = [linear_probe(zf[i], yf[i], zv, yv, num_classes=10)["top1"]
               for i in (class_balanced_subset(yf, 100, seed=s) for s in range(3))]
        print(f"t={t}: held-out linear {linear_probe(zf, yf, zv, yv, num_classes=10)['top1']:.2f} "
              f"kNN {knn_accuracy(zf, yf, zv, yv, k=20):.2f} 1,000 labels {sum(few) / 3:.2f}", flush=True)


def label_decay(feats, ytr, yte, **_) -> None:
    grid = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1)
    for n in (100, 1000):
        draws = [baselines.label_subsets(ytr, (n,), seed=s).get(n) for s in range(ev.label_draws(n))]
        if draws[0] is None:
            print(f"{n} labels: the split holds too few images a class", flush=True)
            continue
        for name, (a, b) in feats.items():
            fixed = [linear_probe(a[d], ytr[d], b, yte, num_classes=10)["top1"] for d in draws]
            # 5 folds, five decays, the probe's 150 iterations: the protocol of the table's CV column
            chosen = choose_probe_settings([(a[d], ytr[d]) for d in draws], 10, scalings=("standardised",), grid=grid,
                                           folds=5, max_iter=150)
            wds = [wd for _, wd in chosen]
            cv = [linear_probe(a[d], ytr[d], b, yte, num_classes=10, weight_decay=w)["top1"]
                  for d, w in zip(draws, wds)]
            print(f"{n} labels, {name}: decay 1e-4 {sum(fixed) / len(fixed):.2f}, CV {sum(cv) / len(cv):.2f} "
                  f"(decays {wds})", flush=True)


def few_label(z, ytr, yte, **_) -> None:
    """The report's few-label probes (``eval.run_probe``'s protocol: ``label_draws`` class-balanced draws of 100
    and 1,000 labelled images, each draw's decay by cross-validation on its own labels) of z at the five t, the
    goal's widest readout (docs/ABLATIONS.md, "The goal's widest readouts"), beside the multi-t code's, which
    must read the report's own figures."""
    readouts = {f"z at {TS}": concat(z, TS), f"z at {MULTI_TS} (the report's multi-t)": concat(z, MULTI_TS)}
    means, _, decays, _ = ev.label_probes(ev._Timer(), readouts, ytr, yte, (100, 1000), 10, joint=False)
    for name, (a, _b) in readouts.items():
        for n in means:
            print(f"{name} ({a.shape[1]}-d), {n} labels: {means[n][name]:.2f} (decays {decays[n][name]})", flush=True)


def draws(feats, ytr, yte, n_draws, **_) -> None:
    """The report's 100-label probes (``eval.label_probes``) of the best t's z and the multi-t code, and of their
    random-conv controls (128-d, 384-d), from ``n_draws`` class-balanced draws, the first ``label_draws(100)`` of them
    the report's own: each readout's lead over its control with the spread of one draw's lead, so that a margin
    can be told from the draws' noise (docs/MAIN_JOB.md, fifteenth session: the report's five draws then)."""
    if n_draws < 2:
        raise SystemExit(f"error: --draws {n_draws}: the spread of the leads needs two draws or more")
    _, each, *_ = ev.label_probes(ev._Timer(), feats, ytr, yte, (100,), 10, joint=False, n_draws=n_draws)
    report = min(ev.label_draws(100), n_draws)
    ours = [k for k in feats if not k.startswith("random conv")]
    for name, control in zip(ours, ("random conv 128-d", "random conv 384-d")):
        a, b = each["100"][name], each["100"][control]
        lead = [x - y for x, y in zip(a, b)]
        sd = statistics.stdev(lead)
        print(f"{name} against {control}, 100 labels, {n_draws} draws: {statistics.mean(a):.2f} vs "
              f"{statistics.mean(b):.2f}, lead {statistics.mean(lead):+.2f} (sd of one draw's lead {sd:.2f}, standard "
              f"error {sd / len(lead) ** 0.5:.2f}); the report's {report} draws: lead "
              f"{statistics.mean(lead[:report]):+.2f}", flush=True)


def full_decay(feats, ytr, yte, fit, val, **_) -> None:
    for name, (a, b) in feats.items():
        for wd in (1e-5, 1e-4, 1e-3, 1e-2):
            held, test = held_out_and_test(a, b, ytr, yte, fit, val, weight_decay=wd)
            print(f"{name}, decay {wd:g}: held-out {held:.2f}, test {test:.2f}", flush=True)


def concat(z, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) codes at the t of ``grid`` concatenated; ``z``: t -> (train codes, test codes)."""
    return tuple(torch.cat([z[t][i] for t in grid], 1) for i in (0, 1))


def grids(z, ytr, yte, fit, val, **_) -> None:
    for grid in itertools.combinations(TS, 3):
        a, b = concat(z, grid)
        held, test = held_out_and_test(a, b, ytr, yte, fit, val)
        print(f"{grid}: held-out linear {held:.2f}, test {test:.2f}", flush=True)


def equal_width(z, ytr, yte, fit, val, width, **_) -> None:
    """The method's claim at equal width (docs/ABLATIONS.md, "Equal width"): readouts of a run's codes no wider
    than ``width`` (a wider z is refused), linear and kNN, held-out then test. Each t's z; z averaged over t; the
    multi-t concatenation projected to ``width`` by PCA (fitted on the probe's own training rows); and, for a code
    narrower than ``width``, every grid of ``width // d`` t concatenated. A code that does not change with t (a
    static encoder) prints its one z."""
    d = z[TS[0]][0].shape[1]
    if d > width:
        raise SystemExit(f"error: the run's z is {d}-d, wider than --width {width}: pass --width {d} or more")
    if all(torch.equal(z[t][0], z[TS[0]][0]) for t in TS):
        feats = {"z (one code at every t)": (z[TS[0]], None)}
    else:
        feats = {f"z at t = {t}": (z[t], None) for t in TS}
        for grid in (MULTI_TS, TS):
            mean = tuple(torch.stack([z[t][i] for t in grid]).mean(0) for i in (0, 1))
            feats[f"mean of z over {grid}"] = (mean, None)
        k = min(width // d, len(TS))
        if k >= 2:
            for grid in itertools.combinations(TS, k):
                feats[f"z at {grid}"] = (concat(z, grid), None)
        for grid in (MULTI_TS, TS):
            if len(grid) * d > width:
                feats[f"PCA-{width} of z at {grid}"] = (concat(z, grid), width)
    _print_readouts(feats, ytr, yte, fit, val)


def wide(model, tr, ytr, te, yte, fit, val, width, **_) -> None:
    """Issue 22's goal readouts, at most ``width`` dimensions (docs/ABLATIONS.md, "The goal's widest readouts"):
    z at the five t; z at ``width // d`` evenly spaced t; z at the five t and the midpoints 0.125, 0.375, 0.625;
    and z at the five t with the denoiser's pooled tokens (DDAE features) appended: the report's own DDAE readout
    (``eval.ddae_readout``, its block and t chosen over the five t on held-out training rows). Linear and kNN,
    held-out then test."""
    d = model.cfg.encoder.dim
    k = width // d
    if k < len(TS):
        raise SystemExit(f"error: --width {width} holds {k} codes of {d}-d; the wide readouts start at the five t "
                         f"({len(TS) * d}-d): pass --width {len(TS) * d} or more")
    spaced = tuple(round(i / (k - 1), 4) for i in range(k))
    between = (0.125, 0.375, 0.625)
    with torch.inference_mode():
        z = {t: (model.embed(tr, t, 256), model.embed(te, t, 256)) for t in sorted({*TS, *spaced, *between})}
    block, t_tokens, held, chosen = ev.ddae_readout(ev._Timer(), model, tr, ytr, te, list(TS), 256, 10,
                                                    progress=False)
    print(f"denoiser tokens chosen as the report chooses them: block {block} at t = {t_tokens} "
          f"({held[(block, t_tokens)]:.2f} on held-out training rows; "
          + ", ".join(f"{key}: {v:.2f}" for key, v in held.items()) + ")", flush=True)
    five = concat(z, TS)
    feats = {f"z at {TS}": (five, None), f"z at {spaced}": (concat(z, spaced), None)}
    if len(TS) + len(between) <= k:
        feats[f"z at {TS + between}"] = (concat(z, TS + between), None)
    if len(TS) * d + chosen[0].shape[1] <= width:
        feats[f"z at {TS} + denoiser block {block} at t = {t_tokens}"] = (tuple(
            torch.cat([five[i], chosen[i]], 1) for i in (0, 1)), None)
    _print_readouts(feats, ytr, yte, fit, val)


NARROW_MEANS = (TS, MULTI_TS, (0.25, 0.5))  # the grids whose codes the narrow check averages


@torch.no_grad()
def pooled_map(model, images: torch.Tensor, t: float, batch_size: int = 256) -> torch.Tensor:
    """A CNN encoder's last feature map at ``t``, averaged over space (its last stage's channels), before the
    encoder's LayerNorm and head: a readout of z's width that the KL bottleneck on z does not reach."""
    x = model._prepare(images)
    return torch.cat([model.encoder.last_map(xb, torch.full((xb.shape[0],), float(t), device=xb.device))
                      .float().mean(dim=(2, 3)) for xb in x.split(batch_size)])


def _hundred_label_leads(feats, ytr, yte, n_draws, control, label) -> None:
    """The report's 100-label stage (``eval.label_probes``) on ``feats``: each readout's mean and its lead over
    ``control`` with the lead's standard error over the ``n_draws`` draws, and in how many draws the
    cross-validation chose one scale for the features."""
    _, each, _, scalings = ev.label_probes(ev._Timer(), feats, ytr, yte, (100,), 10, joint=False, n_draws=n_draws)
    ref = each["100"][control]
    for name, accs in each["100"].items():
        lead = [x - y for x, y in zip(accs, ref)]
        se = statistics.stdev(lead) / len(lead) ** 0.5 if len(lead) > 1 else float("nan")
        print(f"{label}, {name}: {statistics.mean(accs):.2f}, lead {statistics.mean(lead):+.2f} (se {se:.2f}); one "
              f"scale in {sum(s == 'one scale' for s in scalings['100'][name])} of {len(accs)} draws", flush=True)


def narrow(model, tr, ytr, te, yte, fit, val, n_draws, **_) -> None:
    """Readouts of z's width with 100 labels (docs/ABLATIONS.md, sixteenth session): z at each t, z averaged over
    the t of ``NARROW_MEANS``, and a CNN encoder's pooled last map at t = 0, 0.25, 0.5, against the random-conv
    control of that width. Linear and kNN held-out then test; the 100-label stage held-out (draws of the fit rows,
    scored on the val rows, ``n_draws // 2`` draws) then on the test split (``n_draws``), each draw's scaling and
    decay chosen by its cross-validation as in the report (at 43ddbe3, before the report chose the scaling, this
    check also probed a few readouts at one scale and with the scaling chosen by a copy of that rule)."""
    with torch.inference_mode():
        z = {t: (model.embed(tr, t, 256), model.embed(te, t, 256)) for t in TS}
        feats = {f"z at t = {t}": z[t] for t in TS}
        for grid in NARROW_MEANS:
            feats[f"mean of z over {grid}"] = tuple(torch.stack([z[t][i] for t in grid]).mean(0) for i in (0, 1))
        if model.cfg.encoder.arch == "cnn":
            for t in (0.0, 0.25, 0.5):
                feats[f"pooled map at t = {t}"] = (pooled_map(model, tr, t), pooled_map(model, te, t))
        else:
            print(f"no pooled map: the encoder is a {model.cfg.encoder.arch}, not a cnn", flush=True)
        width = z[TS[0]][0].shape[1]
        control = f"random conv {width}-d"
        feats[control] = (baselines.random_conv_features(tr, width, model.device),
                          baselines.random_conv_features(te, width, model.device))
    _print_readouts({k: (v, None) for k, v in feats.items()}, ytr, yte, fit, val)
    held = {k: (a[fit], a[val]) for k, (a, _b) in feats.items()}  # draws of the fit rows, scored on the val rows
    few = max(2, n_draws // 2)
    _hundred_label_leads(held, ytr[fit], ytr[val], few, control, "held-out, 100 labels")
    _hundred_label_leads(feats, ytr, yte, n_draws, control, "test, 100 labels")


def _print_readouts(feats, ytr, yte, fit, val) -> None:
    """One line per readout, name -> ((train, test), PCA width or None): linear and kNN, held-out then test."""
    for name, ((a, b), project) in feats.items():
        held = _linear_and_knn(a[fit], ytr[fit], a[val], ytr[val], project)
        test = _linear_and_knn(a, ytr, b, yte, project)
        print(f"{name} ({min(a.shape[1], project or a.shape[1])}-d): held-out linear {held[0]:.2f} kNN {held[1]:.2f}, "
              f"test linear {test[0]:.2f} kNN {test[1]:.2f}", flush=True)


def _linear_and_knn(a, ya, b, yb, project=None) -> tuple[float, float]:
    """Linear and kNN top-1 of features ``a`` scored on ``b``, first projected to ``project`` dimensions by a PCA
    fitted on ``a`` (``baselines.pca_features``, the report's pixel-PCA baseline) when ``project``."""
    if project:
        a, b = baselines.pca_features(a, b, project)
    return linear_probe(a, ya, b, yb, num_classes=10)["top1"], knn_accuracy(a, ya, b, yb, k=20)


def r_squared(a_fit: torch.Tensor, b_fit: torch.Tensor, a_val: torch.Tensor, b_val: torch.Tensor) -> float:
    """Held-out R^2 of the least-squares affine map a -> b fitted on the fit rows: 1 - residual / total sum of
    squares of b on the val rows, pooled over b's dimensions (the total about the fit rows' mean). 1: b is a
    linear function of a; 0: a says nothing linear about b."""
    def with_bias(a: torch.Tensor) -> torch.Tensor:
        return torch.cat([a.double(), torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)

    w = torch.linalg.lstsq(with_bias(a_fit), b_fit.double()).solution
    pred = with_bias(a_val) @ w
    total = (b_val.double() - b_fit.double().mean(0)).pow(2).sum()
    return float(1 - (b_val.double() - pred).pow(2).sum() / total)


def similarity(z, fit, val, **_) -> None:
    """The multi-t readout gains from its codes only what one does not predict of another (docs/ABLATIONS.md).
    ``z``: t -> the training images' codes."""
    for a, b in SIMILARITY_PAIRS:
        r2 = r_squared(z[a][fit], z[b][fit], z[a][val], z[b][val])
        print(f"t={a} -> t={b}: held-out R^2 {r2:.3f}", flush=True)


def across_image_share(logvar: torch.Tensor) -> float:
    """The share of a log-variance's spread over [images, dimensions] that lies across images within a
    dimension: the mean over dimensions of each one's variance over the images, over the variance of every
    entry. 0 when it is one value per dimension (what ``encoder.kl_variance=time`` builds at a given t)."""
    return float(logvar.double().var(0, unbiased=False).mean() / logvar.double().var(unbiased=False))


def variance(model, tr, **_) -> None:
    """Where a variational code's log-variance varies (docs/ABLATIONS.md, "The bottleneck's variance per t"): per t,
    on the training images, its mean, the share of its spread that changes with the image, the KL, and the
    variance of the mean (the code's signal) a dimension, against which exp(log-variance) is its noise."""
    if model.cfg.encoder.regularizer != "kl":
        raise SystemExit("error: the variance check reads a run trained with encoder.regularizer=kl")
    x = model._prepare(tr)
    eps = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(0), device=x.device)
    for t in TS:
        times = model._times(t, x.shape[0])
        parts = [model.encoder(model.encoder_input(x[i:i + 256], times[i:i + 256], eps[i:i + 256]),
                               times[i:i + 256], sample=False)[1] for i in range(0, x.shape[0], 256)]
        mu, lv = (torch.cat([p[k] for p in parts]) for k in ("mu", "logvar"))
        print(f"t={t}: log-variance mean {lv.mean():.2f}, share across images {across_image_share(lv):.3f}, "
              f"KL {kl_to_standard_normal(mu, lv):.1f} nats an image, the mean's variance {mu.var(0).mean():.3f} a dimension", flush=True)


def iterations(feats, ytr, yte, **_) -> None:
    """The full linear probe stops at 150 L-BFGS iterations: does the figure move when it runs longer?"""
    for name, (a, b) in feats.items():
        for n in (150, 300, 1000):
            r = linear_probe(a, ytr, b, yte, num_classes=10, max_iter=n)
            print(f"{name}, {n} iterations: train {r['train_top1']:.2f}, test {r['top1']:.2f}", flush=True)


def _checkpoint_weights(run: Path, model, last: int) -> list[tuple[int, dict, dict]]:
    """(step, raw weights, EMA weights) of the run's ``last`` checkpoints, oldest first."""
    from fastsemdiff import checkpoint as ck
    from fastsemdiff.models import SemanticDiffusion
    from fastsemdiff.train import make_optimizer

    out = []
    for path in ck.list_checkpoints(run)[-last:]:
        core = SemanticDiffusion(model.cfg)
        named = [(n, q) for n, q in core.named_parameters() if q.requires_grad]
        ema = {n: q.detach().clone() for n, q in named}
        step = ck.load_checkpoint(path, core, make_optimizer([q for _, q in named], model.cfg, torch.device("cpu")),
                                  ema, model.cfg)
        out.append((step, {n: q.detach().clone() for n, q in named}, ema))
    return out


def weights(model, run, tr, ytr, te, yte, fit, val, **_) -> None:
    """Which weights to read z from: the exported EMA, the raw weights at the last checkpoint, or the mean of
    the EMA at the last two (a longer average); multi-t linear, held-out and test."""
    saved = _checkpoint_weights(Path(run), model, last=2)
    if len(saved) < 2:
        raise SystemExit(f"error: {run} keeps {len(saved)} checkpoint(s); the weights check needs two")
    (step0, _, ema0), (step1, raw1, ema1) = saved[-2:]
    variants = {f"EMA at {step1} (exported)": ema1, f"raw at {step1}": raw1,
                f"mean of the EMA at {step0} and {step1}": {n: (ema0[n] + ema1[n]) / 2 for n in ema1}}
    for name, state in variants.items():
        with torch.no_grad():
            for n, q in model.named_parameters():
                if n in state:
                    q.copy_(state[n].to(q.device))
        with torch.inference_mode():
            a, b = (torch.cat([model.embed(x, t, 256) for t in MULTI_TS], 1) for x in (tr, te))
        held, test = held_out_and_test(a, b, ytr, yte, fit, val)
        print(f"{name}: multi-t held-out linear {held:.2f}, test {test:.2f}", flush=True)


def main() -> None:
    checks = {"best-t": best_t, "label-decay": label_decay, "full-decay": full_decay, "grids": grids,
              "iterations": iterations, "weights": weights, "similarity": similarity, "variance": variance,
              "equal-width": equal_width, "wide": wide, "few-label": few_label, "draws": draws, "narrow": narrow}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=list(checks))
    parser.add_argument("run", help="a run directory holding model.safetensors")
    parser.add_argument("--t", type=float, default=0.25, help="the run's best t (label-decay)")
    parser.add_argument("--width", type=int, default=None,
                        help="the widest readout (equal-width: default 128; wide: default 1024)")
    parser.add_argument("--draws", type=int, default=20, help="class-balanced draws of 100 labels (draws, narrow)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N train / test images (tests)")
    args = parser.parse_args()
    model = ev.load_run(args.run)
    tr, ytr = ev.load_data(model.cfg, "train", args.limit)
    if args.check == "variance":  # the encoder's own statistics on the training images
        with torch.inference_mode():
            return variance(model=model, tr=tr)
    fit, val = ev._held_out_split(tr.shape[0])
    if args.check == "similarity":  # codes against codes on the training images: no test split, probes or controls
        with torch.inference_mode():
            z = {t: model.embed(tr, t, 256) for t in sorted({t for pair in SIMILARITY_PAIRS for t in pair})}
        return similarity(z=z, fit=fit, val=val)
    te, yte = ev.load_data(model.cfg, "test", args.limit)
    if args.check == "weights":  # embeds with each set of weights itself
        return weights(model=model, run=args.run, tr=tr, ytr=ytr, te=te, yte=yte, fit=fit, val=val)
    if args.check == "wide":  # embeds at more t than TS, and runs the denoiser
        return wide(model=model, tr=tr, ytr=ytr, te=te, yte=yte, fit=fit, val=val, width=args.width or 1024)
    if args.check == "narrow":  # embeds the encoder's pooled map too
        return narrow(model=model, tr=tr, ytr=ytr, te=te, yte=yte, fit=fit, val=val, n_draws=args.draws)
    with torch.inference_mode():
        z = {t: (model.embed(tr, t, 256), model.embed(te, t, 256)) for t in TS}
    feats = {}
    if args.check in READS_CONTROLS:  # the random-conv controls only where a check reads them
        feats = {f"z at t = {args.t}": z[args.t], "multi-t": concat(z, MULTI_TS)}
        for width in (128, 384):
            feats[f"random conv {width}-d"] = (baselines.random_conv_features(tr, width, model.device),
                                               baselines.random_conv_features(te, width, model.device))
    checks[args.check](z=z, feats=feats, ytr=ytr, yte=yte, fit=fit, val=val, width=args.width or 128,
                       n_draws=args.draws)


if __name__ == "__main__":
    main()
