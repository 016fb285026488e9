"""Evaluate a trained run: linear probe and kNN accuracy of its embeddings across diffusion times.

    python -m fastsemdiff.eval probe --run RUN_DIR [--ts 0 0.1 0.3] [--device cpu] [--batch-size N]
                                     [--out DIR] [--limit-train N] [--limit-test N]

Writes probe.json, probe.png (accuracy against t for each method), embedding-2d.png and
reconstructions.png into the run directory (or --out) and prints a table. Every baseline goes through
the same probe code in the same run (``fastsemdiff.baselines``): raw pixels, PCA of the pixels at the
embedding's width, the same architecture untrained, and DDAE features of the trained denoiser (block and
t chosen on a held-out part of the train split); ``--baseline-run NAME=RUN_DIR`` adds separately trained
models (e.g. the static encoder). Label efficiency: the same probes with 100 and 1,000 labelled images.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Optional, Sequence

import torch
from tqdm import tqdm

from . import baselines
from .data import DatasetError, load_split
from .errors import CheckpointError
from .export import resolve_model_path, write_readout
from .plots import plot_embedding_2d, plot_reconstructions
from .probe import choose_probe_settings, knn_accuracy, linear_probe, linear_probes, plot_accuracy_vs_t

MODEL_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------ shared CLI helpers
def load_run(run: str, device: Optional[str] = None):
    """The trained model of a run, or a SystemExit that says what to do instead of a traceback."""
    path = Path(run)
    if not path.exists():
        raise SystemExit(f"error: {run} does not exist; point --run at a run directory holding {MODEL_FILE}")
    if path.is_dir() and not (path / MODEL_FILE).is_file():
        raise SystemExit(
            f"error: {run} has no {MODEL_FILE}; train a model first (python -m fastsemdiff.train writes "
            f"RUN_DIR/{MODEL_FILE}) or point --run at a run directory that has one"
        )
    import fastsemdiff

    try:
        return fastsemdiff.load(str(path), device=device)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: could not load the model from {run}: {e}") from None


def load_data(cfg, split: str, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the run's dataset (first ``limit`` items), with data problems as a one-line exit."""
    d = cfg.data
    try:
        images, labels = load_split(d.source, d.path, split, d.image_size, d.channels)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def check_ts(ts: Sequence[float]) -> list[float]:
    ts = [float(t) for t in ts]
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise SystemExit(f"error: --ts {ts} must be one or more times in [0, 1] (0 = clean, 1 = pure noise)")
    return ts


def default_out(run: str) -> Path:
    """The run directory, also when --run names the model.safetensors file itself."""
    path = Path(run)
    return path if path.is_dir() else path.parent


# ---------------------------------------------------------------------------------------------- probe
class _Timer:
    """Accumulates seconds per named part, so the report says where the time went."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start


def _probe(timer: _Timer, train_x, train_y, test_x, test_y, knn_k: int, classes: int,
           part: str = "") -> tuple[float, float]:
    with timer(f"{part}linear"):
        linear = linear_probe(train_x, train_y, test_x, test_y, num_classes=classes)["top1"]
    with timer(f"{part}knn"):
        knn = knn_accuracy(train_x, train_y, test_x, test_y, k=knn_k)
    return linear, knn


def _embed_grid(timer, model, train_images, test_images, ts, batch_size, progress, desc):
    """z at every t for both splits: two lists of [N, d] tensors. A model whose z cannot depend on t (a
    static encoder, an untrained one) is embedded once and that embedding stands for every t."""
    grid = ts if model.embedding_depends_on_t() else ts[:1]
    train_z, test_z = [], []
    for t in tqdm(grid, desc=desc, unit="t", disable=not progress):
        with timer("embed"), torch.inference_mode():
            train_z.append(model.embed(train_images, t, batch_size))
            test_z.append(model.embed(test_images, t, batch_size))
    return train_z * (len(ts) // len(grid)), test_z * (len(ts) // len(grid))


def _concat(zs: list, ts: Sequence[float], multi_ts: Sequence[float]) -> torch.Tensor:
    """The multi-t readout: the embeddings at ``multi_ts`` (some of ``ts``), concatenated in that order."""
    return torch.cat([zs[ts.index(t)] for t in multi_ts], 1)


def _probe_grid(timer, train_z, test_z, train_y, test_y, ts, multi_ts, knn_k, classes, part=""):
    """Linear and kNN at each t and on the concatenation over ``multi_ts`` (some of ``ts``). Where every t
    has the same tensor (a t-blind model) it is probed once, and its multi-t readout is that one embedding."""
    if all(z is train_z[0] for z in train_z):
        linear, knn = _probe(timer, train_z[0], train_y, test_z[0], test_y, knn_k, classes, part)
        per_t = [{"t": t, "linear": linear, "knn": knn} for t in ts]
        multi_t = {"ts": list(multi_ts), "linear": linear, "knn": knn, "dim": train_z[0].shape[1], "t_blind": True}
        return per_t, dict(per_t[0]), multi_t
    per_t = []
    for t, a, b in zip(ts, train_z, test_z):
        linear, knn = _probe(timer, a, train_y, b, test_y, knn_k, classes, part)
        per_t.append({"t": t, "linear": linear, "knn": knn})
    k_best, val_scores = _select_best_t(timer, train_z, train_y, ts, knn_k, classes)
    best = {**per_t[k_best], "selected_on": "held-out train", "selected_by": "mean of linear and kNN",
            "selection_val": [{"t": t, **v} for t, v in zip(ts, val_scores)]}
    if len(multi_ts) > 1:
        linear, knn = _probe(timer, _concat(train_z, ts, multi_ts), train_y, _concat(test_z, ts, multi_ts), test_y,
                             knn_k, classes, f"{part}multi-t ")
    else:  # one t: the concatenation is that t's embedding, already probed
        row = per_t[ts.index(multi_ts[0])]
        linear, knn = row["linear"], row["knn"]
    dim = sum(train_z[ts.index(t)].shape[1] for t in multi_ts)
    multi_t = {"ts": list(multi_ts), "linear": linear, "knn": knn, "dim": dim}
    return per_t, best, multi_t


def _held_out_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, val) indices into the train split for choices made without the test split: val a sixth of it,
    fit up to 10,000 of the rest, disjoint (seed 1)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    n_val = max(1, n // 6)
    return perm[n_val:n_val + 10000], perm[:n_val]


def _select_best_t(timer, train_z, train_y, ts, knn_k: int, classes: int) -> tuple[int, list[dict]]:
    """Which t is "the best t": the one whose code scores best on held-out training images
    (``_held_out_split``), by the mean of the linear probe's and kNN's top-1, so the test split only reads the
    chosen t's result. Both, because the report judges the readout by both: the linear probe alone rates the
    codes of neighbouring t within a few hundredths while their kNN differ by points (t = 0 against t = 0.25 in
    docs/ABLATIONS.md), and a coin flip on one metric should not pick the code that is worse on the other.
    Returns (its index into ``ts``, each t's held-out ``linear``, ``knn`` and ``score``)."""
    fit, val = _held_out_split(train_z[0].shape[0])
    scores = []
    for z in train_z:
        with timer("best-t selection"):
            linear = linear_probe(z[fit], train_y[fit], z[val], train_y[val], num_classes=classes)["top1"]
            knn = knn_accuracy(z[fit], train_y[fit], z[val], train_y[val], k=knn_k)
        scores.append({"linear": linear, "knn": knn, "score": (linear + knn) / 2})
    return max(range(len(ts)), key=lambda k: scores[k]["score"]), scores


def _readout(name: str, train_z, test_z, ts, multi_t: dict) -> dict:
    """A baseline's features for label efficiency: its multi-t concatenation, or its one embedding if t-blind."""
    if multi_t.get("t_blind"):
        return {name: (train_z[0], test_z[0])}
    return {f"{name}, multi-t": (_concat(train_z, ts, multi_t["ts"]), _concat(test_z, ts, multi_t["ts"]))}


def _select_ddae(timer, model, train_images, train_labels, ts, batch_size, classes, progress):
    """(block, t) of the DDAE features with the best linear probe on a held-out sixth of the train split
    (no test images are used to choose), and the per-t validation accuracy of each t's best block."""
    n = train_images.shape[0]
    n_val = max(1, n // 6)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:min(n, 12000)]
    fit, val = pick[n_val:] if len(pick) > n_val else pick, pick[:n_val]
    scores = {}
    for t in tqdm(ts, desc="DDAE block and t", unit="t", disable=not progress):
        with timer("DDAE features"), torch.inference_mode():
            feats = baselines.ddae_features(model, train_images[pick], t, batch_size)
        pos = {int(i): k for k, i in enumerate(pick)}
        fi, vi = torch.tensor([pos[int(i)] for i in fit]), torch.tensor([pos[int(i)] for i in val])
        for block, f in enumerate(feats):
            with timer("DDAE selection"):
                scores[(block, t)] = linear_probe(f[fi], train_labels[fit], f[vi], train_labels[val],
                                                  num_classes=classes)["top1"]
    block, t = max(scores, key=scores.get)
    return block, t, scores


def ddae_readout(timer, model, train_images, train_labels, test_images, ts, batch_size, classes, progress):
    """The report's DDAE readout: (block, t) chosen by ``_select_ddae`` on held-out training images, then that
    block's pooled tokens at that t for both splits. Returns (block, t, the selection's scores, (train, test))."""
    block, t, scores = _select_ddae(timer, model, train_images, train_labels, ts, batch_size, classes, progress)
    with timer("DDAE features"), torch.inference_mode():
        feats = tuple(baselines.ddae_features(model, x, t, batch_size)[block] for x in (train_images, test_images))
    return block, t, scores, feats


def _select_z_plus_denoiser(timer, multi_train: torch.Tensor, ddae_train: torch.Tensor, train_labels, multi_ts,
                            dim: int, classes: int) -> tuple[int, dict]:
    """The multi-t readout with one t's z replaced by the denoiser's pooled tokens (the DDAE features at the
    block and t already chosen): at the multi-t width when the denoiser is as wide as z. Which t gives way is
    chosen on held-out training images (fit on up to 10,000, scored on a sixth of the split, disjoint; seed 1),
    never on the test split. Returns (the index into multi_ts dropped, each choice's held-out linear %)."""
    fit, val = _held_out_split(multi_train.shape[0])
    scores = {}
    for k, t in enumerate(multi_ts):
        feats = _z_plus_denoiser(multi_train, ddae_train, k, dim)
        with timer("z + denoiser selection"):
            scores[float(t)] = linear_probe(feats[fit], train_labels[fit], feats[val], train_labels[val],
                                            num_classes=classes)["top1"]
    drop = max(range(len(multi_ts)), key=lambda k: scores[float(multi_ts[k])])
    return drop, scores


def _z_plus_denoiser(multi: torch.Tensor, ddae: torch.Tensor, drop: int, dim: int) -> torch.Tensor:
    """The multi-t concatenation without the ``drop``-th t's z (columns drop*dim .. +dim), the denoiser's
    tokens appended."""
    keep = torch.cat([multi[:, :drop * dim], multi[:, (drop + 1) * dim:]], 1)
    return torch.cat([keep, ddae.to(keep.device)], 1)


def label_probes(timer: _Timer, features: dict, train_labels: torch.Tensor, test_labels: torch.Tensor,
                 label_sizes: Sequence[int], classes: int, joint: bool, n_draws: Optional[int] = None,
                 judged: Optional[Collection[str]] = None) -> tuple[dict, dict, dict, dict]:
    """The label-efficiency stage: each readout of ``features`` (name -> (train, test)) probed with class-balanced
    draws of each size, draw k from seed k, each draw's feature scaling and weight decay chosen by
    cross-validation on its own labels (``probe.choose_probe_settings``):
    ``n_draws`` draws of every readout, or by default ``label_draws`` of the size for the readouts in ``judged``
    (those a margin compares; None: every readout) and ``LABEL_DRAWS`` for the rest. Returns (mean, per draw,
    decays per draw, scalings per draw), each size -> readout -> figures; ``joint``: every readout and draw of a
    size as one L-BFGS problem (a GPU's way)."""
    label_eff: dict = {}
    label_each: dict = {}
    label_decay: dict = {}
    label_scaling: dict = {}
    for n in label_sizes:
        count = {k: n_draws if n_draws is not None else label_draws(n) if judged is None or k in judged
                 else LABEL_DRAWS for k in features}
        subsets = [baselines.label_subsets(train_labels, (n,), seed=s).get(n)
                   for s in range(max(count.values(), default=0))]
        if not subsets or subsets[0] is None:  # a split with fewer than n // classes images of some class
            continue
        problems = [(k, d) for k in features for d in subsets[:count[k]]]  # (readout, draw), readout by readout
        trains = [(features[k][0][d.to(features[k][0].device)], train_labels[d]) for k, d in problems]
        with timer("label efficiency, weight decay"):  # and scaling, by cross-validation on each draw's own labels
            # on a CPU, as many single-threaded processes as torch would use threads (OMP_NUM_THREADS included)
            settings = choose_probe_settings(trains, classes, joint=joint, workers=torch.get_num_threads())
        scalings, decays = [sc for sc, _ in settings], [wd for _, wd in settings]
        with timer("label efficiency"):
            if joint:  # every readout and draw of this size as one L-BFGS problem
                accs = linear_probes(trains, [(features[k][1], test_labels) for k, _ in problems], classes,
                                     weight_decay=decays, max_iter=LABEL_MAX_ITER, scaling=scalings)
            else:
                accs = [linear_probe(x, y, features[k][1], test_labels, num_classes=classes, weight_decay=wd,
                                     scaling=sc)["top1"]
                        for (x, y), (k, _), (sc, wd) in zip(trains, problems, settings)]
        each: dict = {}
        decay: dict = {}
        scaling: dict = {}
        for (k, _), acc, (sc, wd) in zip(problems, accs, settings):
            each.setdefault(k, []).append(acc)
            decay.setdefault(k, []).append(wd)
            scaling.setdefault(k, []).append(sc)
        label_each[str(n)], label_decay[str(n)], label_scaling[str(n)] = each, decay, scaling
        label_eff[str(n)] = {k: sum(a) / len(a) for k, a in each.items()}
    return label_eff, label_each, label_decay, label_scaling


def run_probe(model, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
              test_labels: torch.Tensor, ts: Sequence[float], batch_size: int, knn_k: int,
              progress: bool = True, with_baselines: bool = True, baseline_runs: Optional[dict] = None,
              label_sizes: Sequence[int] = (100, 1000), features_out: Optional[dict] = None,
              multi_ts: Optional[Sequence[float]] = None, joint_labels: Optional[bool] = None,
              z_plus_denoiser: bool = False) -> dict:
    """Linear-probe and kNN top-1 (%) of the embedding at every t, for the concatenation over ``multi_ts``
    (some of ``ts``; default all), and the same for
    every baseline (raw pixels always; PCA, untrained architecture, DDAE and ``baseline_runs`` models with
    ``with_baselines``), plus label efficiency. ``features_out``, when given, receives every method's
    (train, test) features, so the caller's plots need not embed again. ``joint_labels``: the label-efficiency
    probes solved as one problem per size (``linear_probes``) rather than one per readout and draw; None: on a
    GPU only, where the per-draw probes wait on host synchronisations (68.6 s of a 102.5 s probe on an H200);
    a CPU keeps the per-draw probes, whose figures are the ones published (the joint solve lands within 0.04
    point of them, and was not clearly faster on a 2-core CPU). ``z_plus_denoiser``: also the "embedding +
    denoiser" readout (the multi-t code with one t's z replaced by the DDAE features; needs the baselines), a
    lever of issue 22 that lost to the multi-t readout at the same width on every run measured
    (docs/ABLATIONS.md), so it is not part of the default report."""
    start = time.perf_counter()
    timer = _Timer()
    ts = [float(t) for t in ts]
    multi_ts = [float(t) for t in (multi_ts or ts)]
    if not set(multi_ts) <= set(ts):
        raise ValueError(f"multi_ts {multi_ts} must be some of ts {ts}")
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    dev = model.device
    features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # method -> (train, test), for label efficiency
    zd_result: Optional[dict] = None  # the multi-t readout with one t's z replaced by the denoiser's tokens

    train_z, test_z = _embed_grid(timer, model, train_images, test_images, ts, batch_size, progress, "probe over t")
    per_t, best_t, multi_t = _probe_grid(timer, train_z, test_z, train_labels, test_labels, ts, multi_ts, knn_k,
                                         classes)
    k_best = ts.index(best_t["t"])
    features["embedding, best t"] = (train_z[k_best], test_z[k_best])
    if multi_t.get("t_blind"):  # its multi-t readout is its one embedding, as in the probes above
        features["embedding, multi-t"] = features["embedding, best t"]
    else:
        features["embedding, multi-t"] = (_concat(train_z, ts, multi_ts), _concat(test_z, ts, multi_ts))
    dim = train_z[0].shape[1]
    del train_z, test_z

    train_px, test_px = baselines.pixel_features(train_images, dev), baselines.pixel_features(test_images, dev)
    linear, knn = _probe(timer, train_px, train_labels, test_px, test_labels, knn_k, classes, "pixels ")
    raw = {"linear": linear, "knn": knn, "dim": train_px.shape[1]}
    features["raw pixels"] = (train_px, test_px)
    result_baselines: dict = {}
    if with_baselines:
        result_baselines["random_conv"] = {}
        for width in sorted({dim, multi_t["dim"]}):
            with timer("random conv features"):
                rc_train = baselines.random_conv_features(train_images, width, dev)
                rc_test = baselines.random_conv_features(test_images, width, dev)
            linear, knn = _probe(timer, rc_train, train_labels, rc_test, test_labels, knn_k, classes,
                                 f"random conv {width} ")
            features[f"random conv, {rc_train.shape[1]}-d"] = (rc_train, rc_test)
            result_baselines["random_conv"][str(width)] = {
                "linear": linear, "knn": knn, "dim": rc_train.shape[1],
                "filters": baselines.random_conv_filters(width)}
        with timer("PCA"):
            pca_train, pca_test = baselines.pca_features(train_px, test_px, dim)
        linear, knn = _probe(timer, pca_train, train_labels, pca_test, test_labels, knn_k, classes, "PCA ")
        features["pixel PCA"] = (pca_train, pca_test)
        result_baselines["pixel_pca"] = {"linear": linear, "knn": knn, "dim": dim}

        fresh = baselines.untrained_like(model)
        rz_train, rz_test = _embed_grid(timer, fresh, train_images, test_images, ts, batch_size, progress,
                                        "untrained encoder")
        r_per_t, r_best, r_multi = _probe_grid(timer, rz_train, rz_test, train_labels, test_labels, ts, multi_ts,
                                               knn_k, classes, "untrained ")
        features.update(_readout("untrained", rz_train, rz_test, ts, r_multi))
        result_baselines["untrained_encoder"] = {"per_t": r_per_t, "best_t": r_best, "multi_t": r_multi}
        del fresh, rz_train, rz_test

        block, t_ddae, scores, (f_train, f_test) = ddae_readout(timer, model, train_images, train_labels,
                                                                test_images, ts, batch_size, classes, progress)
        linear, knn = _probe(timer, f_train, train_labels, f_test, test_labels, knn_k, classes, "DDAE ")
        features["DDAE"] = (f_train, f_test)
        result_baselines["ddae"] = {
            "block": block, "t": t_ddae, "linear": linear, "knn": knn, "dim": f_train.shape[1],
            "selection_val_linear": [{"block": b, "t": t, "linear": v} for (b, t), v in sorted(scores.items())],
        }
        if z_plus_denoiser and len(multi_ts) > 1 and not multi_t.get("t_blind"):
            m_train, m_test = features["embedding, multi-t"]
            drop, zd_scores = _select_z_plus_denoiser(timer, m_train, f_train, train_labels, multi_ts, dim, classes)
            zd_train = _z_plus_denoiser(m_train, f_train, drop, dim)
            zd_test = _z_plus_denoiser(m_test, f_test, drop, dim)
            linear, knn = _probe(timer, zd_train, train_labels, zd_test, test_labels, knn_k, classes, "z + denoiser ")
            features["embedding + denoiser"] = (zd_train, zd_test)
            zd_result = {"ts": [t for k, t in enumerate(multi_ts) if k != drop], "ddae_block": block,
                         "ddae_t": t_ddae, "linear": linear, "knn": knn, "dim": zd_train.shape[1],
                         "selection_val_linear": [{"dropped_t": t, "linear": v} for t, v in zd_scores.items()]}
        for name, other in (baseline_runs or {}).items():
            oz_train, oz_test = _embed_grid(timer, other, train_images, test_images, ts, batch_size, progress, name)
            o_per_t, o_best, o_multi = _probe_grid(timer, oz_train, oz_test, train_labels, test_labels, ts,
                                                   multi_ts, knn_k, classes, f"{name} ")
            features.update(_readout(name, oz_train, oz_test, ts, o_multi))
            result_baselines[name] = {"per_t": o_per_t, "best_t": o_best, "multi_t": o_multi}

    judged = {k for k in features if k in JUDGED_READOUTS or k.startswith("random conv, ")}  # what a margin reads
    label_eff, label_each, label_decay, label_scaling = label_probes(
        timer, features, train_labels, test_labels, label_sizes, classes,
        dev.type == "cuda" if joint_labels is None else joint_labels, judged=judged)

    if features_out is not None:
        features_out.update(features)
    result = {
        "per_t": per_t,
        "best_t": best_t,
        "multi_t": multi_t,
        "raw_pixels": raw,
        "baselines": result_baselines,
        "label_efficiency": label_eff,  # the mean over label_draws(n) class-balanced draws of n labelled images
        "label_efficiency_draws": label_each,
        "label_efficiency_weight_decay": label_decay,  # each draw's, chosen by cross-validation on its labels
        "label_efficiency_scaling": label_scaling,  # each draw's feature scaling, chosen with its decay
        "embedding_dim": dim,
        "n_train": int(train_images.shape[0]),
        "n_test": int(test_images.shape[0]),
        "knn_k": knn_k,
        "seconds": time.perf_counter() - start,
        "timings": {k: round(v, 3) for k, v in timer.parts.items()},
    }
    if zd_result is not None:
        result["z_plus_denoiser"] = zd_result
    result["against_controls"] = against_controls(result)
    result["controls_verdict"] = controls_verdict(result["against_controls"])
    static = against_static(result)
    if static:
        result["against_static"] = static
    return result


# Label-efficiency probes average this many class-balanced draws (seeds 0, 1, ...): with 10 images a class,
# one draw moves the accuracy by about a point, as much as the gaps the report compares.
LABEL_DRAWS = 5
# ... and more where five are too few to judge a margin: with 100 labels one draw moves a readout's lead over its
# control by 1.2-1.6 points (sd, twenty draws, docs/MAIN_JOB.md), so five draws knew the lead to about +-0.6 and
# favoured our code on both runs measured; twenty know it to +-0.3. With 1,000 labels the lead moves 0.55-0.9.
LABEL_DRAWS_BY_SIZE = {100: 20}
# The readouts whose few-label figures a margin compares (``against_controls``), with their random-conv controls:
# these get ``label_draws`` of each size; the other baselines' figures are context and keep ``LABEL_DRAWS``, so the
# fifteen more draws of 100 labels cost four or five readouts' probes, not every baseline's (docs/MAIN_JOB.md).
JUDGED_READOUTS = ("embedding, best t", "embedding, multi-t", "embedding + denoiser")


def label_draws(n: int) -> int:
    """How many class-balanced draws of ``n`` labelled images the report averages."""
    return LABEL_DRAWS_BY_SIZE.get(int(n), LABEL_DRAWS)


# L-BFGS iterations of the label-efficiency stage's joint problem (probe.linear_probes: every readout and draw of
# one size solved at once, so a GPU runs a few hundred launches for the stage, not tens of thousands): one
# step size serves every problem, so it needs more than one probe's 150 to land within 0.1 point of the
# per-draw figures (docs/ABLATIONS.md, "The label-efficiency stage").
LABEL_MAX_ITER = 300
GOAL = {"linear": 91.0, "knn": 89.0, "1000": 83.0, "100": 75.0}  # the quality issue's goal for a readout <= 1,024-d
# The required lead over the random-conv control of the same width, in points, on every metric (issue 22): a
# lead of a tenth of a point beats the control on paper, but is not a difference a user would notice.
REQUIRED_LEAD = 1.0


def against_controls(result: dict) -> list[dict]:
    """Each readout of the embedding (best t, multi-t) against the random-conv control of the same width, on
    every readout metric (linear, kNN, 1,000 and 100 labels): whether it beats the control, its lead in points
    and whether that reaches ``REQUIRED_LEAD`` (``short_by``: the points missing), and how far the goal is."""
    controls = result.get("baselines", {}).get("random_conv", {})
    label_eff = result.get("label_efficiency", {})
    rows = []
    for readout, name in (("best_t", "embedding, best t"), ("multi_t", "embedding, multi-t"),
                          ("z_plus_denoiser", "embedding + denoiser")):
        if readout not in result:
            continue
        ours = result[readout]
        width = ours.get("dim", result["embedding_dim"])
        control = controls.get(str(width))
        if control is None:
            continue
        cname = f"random conv, {control['dim']}-d"
        metrics = {"linear": (ours["linear"], control["linear"]), "knn": (ours["knn"], control["knn"])}
        for n in ("1000", "100"):
            if n in label_eff and name in label_eff[n]:
                metrics[n] = (label_eff[n][name], label_eff[n][cname])
        rows.append({"readout": name, "dim": width, "control_dim": control["dim"],
                     "metrics": {k: _margin(k, a, b) for k, (a, b) in metrics.items()}})
    return rows


def _margin(metric: str, ours: float, control: float) -> dict:
    """One metric's comparison: beats, the lead and the required lead (rounded to 0.01 point, the report's
    precision, before comparing, so a lead printed as 1.00 passes), and the distance to the goal."""
    lead = round(ours - control, 2)
    return {"ours": ours, "control": control, "beats": ours > control, "lead": lead,
            "required_lead": REQUIRED_LEAD, "leads_by_required": lead >= REQUIRED_LEAD,
            "short_by": round(max(0.0, REQUIRED_LEAD - lead), 2),
            "goal": GOAL[metric], "to_goal": round(max(0.0, GOAL[metric] - ours), 2)}


STATIC_RUN = "static"  # --baseline-run names of static encoders E(x0): "static", or "static-..." (README 1b)


def _is_static_run(name: str) -> bool:
    return name == STATIC_RUN or name.startswith(STATIC_RUN + "-")


def against_static(result: dict) -> list[dict]:
    """The method's own claim (issue 22): the time-conditioned code leads the static code E(x0) of the same
    width by ``REQUIRED_LEAD`` on the linear probe. Each static run (``--baseline-run static=...``, or
    ``static-NAME=...``) is compared with our readout of its code's width: the best t (one z) at the embedding's
    width, the multi-t code at its concatenated width (a static encoder trained with a z that wide is the
    equal-width baseline of the multi-t readout, which a static code cannot have). Empty where no width matches."""
    ours_by_width = {result["embedding_dim"]: ("embedding, best t", result["best_t"])}
    multi = result["multi_t"]
    if not multi.get("t_blind"):
        ours_by_width.setdefault(multi["dim"], ("embedding, multi-t", multi))
    rows = []
    for name, static in result.get("baselines", {}).items():
        if not _is_static_run(name) or "multi_t" not in static:
            continue
        m = static["multi_t"]
        width = m["dim"] if m.get("t_blind") else m["dim"] // len(m["ts"])  # one z of the static run
        if width not in ours_by_width:
            continue
        readout, ours = ours_by_width[width]
        lead = round(ours["linear"] - static["best_t"]["linear"], 2)
        rows.append({"readout": readout, "dim": width, "static_run": name, "ours": ours["linear"],
                     "static": static["best_t"]["linear"], "lead": lead, "required_lead": REQUIRED_LEAD,
                     "leads_by_required": lead >= REQUIRED_LEAD})
    return rows


def controls_verdict(rows: list[dict]) -> dict:
    """The report's one-line answer: does every readout lead its control by ``REQUIRED_LEAD`` on every metric,
    and which (readout, metric) pairs do not."""
    short = [f"{r['readout']}: {k} (lead {m['lead']:+.2f})" for r in rows for k, m in r["metrics"].items()
             if not m["leads_by_required"]]
    return {"required_lead": REQUIRED_LEAD, "all_lead_by_required": bool(rows) and not short, "short": short}


def _margin_cell(metric: str, m: dict) -> str:
    """'linear 87.12 vs 85.76 beats by 1.36, goal 91 (3.88 to go)', with the missing lead where it is short."""
    cell = f"{metric} {m['ours']:.2f} vs {m['control']:.2f} {'beats' if m['beats'] else 'LOSES'} by {abs(m['lead']):.2f}"
    if not m["leads_by_required"]:
        cell += f" (short of +{m['required_lead']:g} by {m['short_by']:.2f})"
    to_go = f"{m['to_goal']:.2f} to go" if m["to_goal"] else "met"
    return f"{cell}, goal {m['goal']:g} ({to_go})"


def format_table(result: dict) -> str:
    """The probe result as aligned text: one row per t, then the summaries, the baselines and label efficiency."""
    lines = [f"{'t':>10} | {'linear %':>9} | {'kNN %':>7}", f"{'-' * 10}-+-{'-' * 9}-+-{'-' * 7}"]
    row = "{:>10} | {:9.2f} | {:7.2f}"
    for r in result["per_t"]:
        lines.append(row.format(f"{r['t']:g}", r["linear"], r["knn"]))
    lines.append(f"{'-' * 10}-+-{'-' * 9}-+-{'-' * 7}")
    m, b, p = result["multi_t"], result["best_t"], result["raw_pixels"]
    lines.append(row.format("multi-t", m["linear"], m["knn"]) + f"   (t in {m['ts']}, dim {m['dim']})")
    lines.append(row.format("best t", b["linear"], b["knn"]) + f"   (t = {b['t']:g})")
    lines.append(row.format("pixels", p["linear"], p["knn"]))
    summary = [("embedding, multi-t", m["linear"], m["knn"], f"dim {m['dim']}"),
               ("embedding, best t", b["linear"], b["knn"], f"t = {b['t']:g}"),
               ("raw pixels", p["linear"], p["knn"], f"dim {p['dim']}")]
    if "z_plus_denoiser" in result:
        zd = result["z_plus_denoiser"]
        summary.insert(2, ("embedding + denoiser", zd["linear"], zd["knn"],
                           f"z at t in {zd['ts']} + denoiser block {zd['ddae_block']} at t = {zd['ddae_t']:g}, "
                           f"dim {zd['dim']}"))
    for name, r in result.get("baselines", {}).items():
        if name == "random_conv":
            summary += [(f"random conv, {c['dim']}-d", c["linear"], c["knn"], f"{c['filters']} untrained filters")
                        for c in r.values()]
            continue
        if r.get("multi_t", {}).get("t_blind"):
            summary.append((name, r["multi_t"]["linear"], r["multi_t"]["knn"], f"z ignores t, dim {r['multi_t']['dim']}"))
        elif "multi_t" in r:
            summary.append((f"{name}, multi-t", r["multi_t"]["linear"], r["multi_t"]["knn"], ""))
            summary.append((f"{name}, best t", r["best_t"]["linear"], r["best_t"]["knn"], f"t = {r['best_t']['t']:g}"))
        else:
            where = f"block {r['block']}, t = {r['t']:g}" if "block" in r else f"dim {r['dim']}"
            summary.append((name, r["linear"], r["knn"], where))
    if len(summary) > 3:
        lines += ["", f"{'method':<30} | {'linear %':>9} | {'kNN %':>7} |", "-" * 55]
        lines += [f"{n:<30} | {lin:9.2f} | {knn:7.2f} | {note}" for n, lin, knn, note in summary]
    for row in result.get("against_controls", []):
        cells = "; ".join(_margin_cell(k, m) for k, m in row["metrics"].items())
        lines.append(f"\n{row['readout']} ({row['dim']}-d) against random conv ({row['control_dim']}-d): {cells}")
    if result.get("against_controls"):
        verdict = controls_verdict(result["against_controls"])
        lines.append(f"\nevery readout leads its control by >= {verdict['required_lead']:g} point on every metric: "
                     + ("yes" if verdict["all_lead_by_required"] else "NO (" + "; ".join(verdict["short"]) + ")"))
    for st in result.get("against_static", []):
        lines.append(f"\ntime-conditioned ({st['readout']}) against static ({st['static_run']}) at {st['dim']}-d "
                     f"(linear): {st['ours']:.2f} vs {st['static']:.2f}, lead {st['lead']:+.2f} "
                     f"({'>=' if st['leads_by_required'] else 'short of'} +{st['required_lead']:g})")
    for n in result.get("label_efficiency", {}):
        lines.append("\n" + _label_efficiency_line(result, n))
    return "\n".join(lines)


def _draw_counts(result: dict, n: str) -> dict[str, int]:
    """How many draws of ``n`` labels each readout's mean in a report averages: its own recorded draws, or for a
    report that recorded none (written before the draws were kept) ``LABEL_DRAWS``, the count of that time."""
    each = result.get("label_efficiency_draws", {}).get(n, {})
    return {name: len(each[name]) if name in each else LABEL_DRAWS for name in result["label_efficiency"][n]}


def _label_efficiency_line(result: dict, n: str) -> str:
    """The report's line for ``n`` labels: one draw count when every readout has it, else each readout's own
    (the readouts a margin compares get more draws of 100 labels than the other baselines)."""
    counts = _draw_counts(result, n)
    accs = result["label_efficiency"][n]
    if len(set(counts.values())) == 1:
        line = (f"linear probe with {n} labelled images (mean of {next(iter(counts.values()))} draws): "
                + ", ".join(f"{name} {acc:.2f}" for name, acc in accs.items()))
    else:
        line = (f"linear probe with {n} labelled images (mean of each readout's draws): "
                + ", ".join(f"{name} {acc:.2f} ({counts[name]} draws)" for name, acc in accs.items()))
    scalings = result.get("label_efficiency_scaling", {}).get(n)
    if scalings:  # reports before the scaling was chosen standardised every draw, and say nothing
        line += (". Each draw's scaling chosen with its decay by cross-validation on its labels; one scale in: "
                 + ", ".join(f"{name} {sum(s == 'one scale' for s in chosen)}/{len(chosen)}"
                             for name, chosen in scalings.items()))
    return line


def training_speed(run_dir: Path) -> Optional[float]:
    """Median training images/s of the run (its metrics.jsonl), so a report says how fast its machine was."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    speeds = sorted(r["img_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "img_per_s" in r)
    return round(speeds[len(speeds) // 2], 1) if speeds else None


def best_readout(result: dict) -> dict:
    """The embedding's readout with the best linear probe: one t, or the multi-t concatenation."""
    best, multi = result["best_t"], result["multi_t"]
    if multi["linear"] > best["linear"] and not multi.get("t_blind"):
        return {"ts": list(multi["ts"]), "linear": multi["linear"], "dim": multi["dim"]}
    return {"t": best["t"], "linear": best["linear"], "dim": result["embedding_dim"]}


def _curves(result: dict) -> dict[str, list[dict]]:
    """Linear accuracy against t for every method that has one, for the plot."""
    curves = {}
    for name, r in result.get("baselines", {}).items():
        if "per_t" in r:
            curves[f"{name.replace('_', ' ')}, linear"] = r["per_t"]
    ddae = result.get("baselines", {}).get("ddae")
    if ddae:
        best = {}
        for row in ddae["selection_val_linear"]:
            if row["linear"] > best.get(row["t"], {"linear": -1})["linear"]:
                best[row["t"]] = row
        curves["DDAE (best block, held-out train)"] = [{"t": t, "linear": r["linear"]} for t, r in sorted(best.items())]
    return curves


def multi_t_grid(cli_multi_ts, cli_ts, cfg_multi_ts, ts: list[float]) -> list[float]:
    """The multi-t readout's grid: --multi-ts, else eval.multi_ts (unless --ts replaced the grid it was
    chosen from), else every t of the probe; it must be some of the probed ts."""
    chosen = cli_multi_ts if cli_multi_ts is not None else (cfg_multi_ts if cli_ts is None else None)
    multi_ts = check_ts(chosen) if chosen else ts
    missing = sorted(set(multi_ts) - set(ts))
    if missing:
        raise SystemExit(f"error: the multi-t grid {multi_ts} has times the probe does not embed ({missing}); "
                         f"add them to --ts (now {ts}) or choose --multi-ts among those")
    return multi_ts


def _flat_figures(result: dict) -> dict[str, float]:
    """The t-free linear figures the plot draws as lines: the multi-t readout, the random-conv controls,
    pixels, PCA, DDAE (kNN of the pixels too)."""
    m = result["multi_t"]
    flat = {f"our multi-t readout ({m['dim']}-d), linear": m["linear"]}
    for c in result.get("baselines", {}).get("random_conv", {}).values():
        flat[f"random conv {c['dim']}-d, linear"] = c["linear"]
    flat.update({"raw pixels, linear": result["raw_pixels"]["linear"], "raw pixels, kNN": result["raw_pixels"]["knn"]})
    for name in ("pixel_pca", "ddae"):
        if name in result.get("baselines", {}):
            flat[f"{name.replace('_', ' ')}, linear (chosen)"] = result["baselines"][name]["linear"]
    return flat


def source_commit() -> Optional[str]:
    """The git commit of the checkout this package runs from (an editable install), or None."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _report_note(result: dict) -> str:
    """Under the plot: where the figures come from, so a PNG read alone says which run and machine."""
    parts = [f"commit {result['commit']}" if result.get("commit") else "commit unknown",
             f"{result['n_train']:,} train / {result['n_test']:,} test images"]
    if result.get("training_img_per_s"):
        parts.append(f"trained at {result['training_img_per_s']:.0f} images/s")
    return "; ".join(parts)


def probe_command(args: argparse.Namespace) -> dict:
    model = load_run(args.run, args.device)
    run_dir = resolve_model_path(args.run).parent  # where the model, its metrics and its readout live
    cfg = model.cfg
    ts = check_ts(args.ts if args.ts is not None else cfg.eval.ts)
    multi_ts = multi_t_grid(args.multi_ts, args.ts, cfg.eval.multi_ts, ts)
    train_images, train_labels = load_data(cfg, "train", args.limit_train)
    test_images, test_labels = load_data(cfg, "test", args.limit_test)
    out = Path(args.out) if args.out else default_out(args.run)
    out.mkdir(parents=True, exist_ok=True)
    print(f"probing {args.run}: {len(train_labels)} train / {len(test_labels)} test images, t in {ts} "
          f"(multi-t readout: {multi_ts}), device {model.device}")

    runs = {name: load_run(path, args.device) for name, path in (args.baseline_run or [])}
    features: dict = {}
    result = run_probe(model, train_images, train_labels, test_images, test_labels, ts,
                       args.batch_size or cfg.eval.batch_size, cfg.eval.knn_k,
                       with_baselines=not args.no_baselines, baseline_runs=runs, features_out=features,
                       multi_ts=multi_ts, z_plus_denoiser=args.z_plus_denoiser)
    result["training_img_per_s"] = training_speed(run_dir)
    result["commit"] = source_commit()
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.limit_train is None and args.limit_test is None:  # a full-split probe decides embed()'s default
        readout = best_readout(result)
        write_readout(run_dir, readout)
        model.readout = readout
    plot_accuracy_vs_t(result["per_t"], out / "probe.png", _flat_figures(result), _curves(result),
                       note=_report_note(result))
    test_features = features["embedding, multi-t"][1]
    plot_embedding_2d(baselines.project_2d(test_features).cpu(), test_labels, out / "embedding-2d.png")
    if not args.no_baselines:
        picks = test_images[:8]
        with torch.inference_mode():
            recon = model.reconstruct(picks, t=result["best_t"]["t"], steps=args.recon_steps)  # z at the best t
        plot_reconstructions(model.as_images(picks), recon, out / "reconstructions.png", t=result["best_t"]["t"])
    print(format_table(result))
    if result["training_img_per_s"]:
        print(f"the model trained at {result['training_img_per_s']:.0f} images/s (median of metrics.jsonl): "
              "machines of one kind differ up to 3x, so compare timings at equal images/s")
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items())
    print(f"total {result['seconds']:.1f} s ({parts}); wrote probe.json, probe.png, embedding-2d.png and "
          f"reconstructions.png in {out}")
    return result


def _name_and_run(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=RUN_DIR, e.g. static=runs/static")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastsemdiff.eval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="linear probe and kNN accuracy of the embeddings across t")
    p.add_argument("--run", required=True, help=f"run directory holding {MODEL_FILE} (or the file itself)")
    p.add_argument("--ts", type=float, nargs="+", default=None, help="diffusion times (default: eval.ts)")
    p.add_argument("--multi-ts", type=float, nargs="+", default=None,
                   help="the times the multi-t readout concatenates, some of --ts (default: eval.multi_ts, or "
                        "every t of --ts)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best available)")
    p.add_argument("--batch-size", type=int, default=None, help="embedding batch size (default: eval.batch_size)")
    p.add_argument("--out", default=None, help="folder for probe.json and probe.png (default: the run directory)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N train images (tests)")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images (tests)")
    p.add_argument("--no-baselines", action="store_true", help="only the embedding and raw pixels (faster)")
    p.add_argument("--baseline-run", type=_name_and_run, action="append", metavar="NAME=RUN_DIR",
                   help="a separately trained model probed as a baseline (e.g. static=runs/static); repeatable")
    p.add_argument("--z-plus-denoiser", action="store_true",
                   help="also the 'embedding + denoiser' readout: the multi-t code with one t's z replaced by the "
                        "denoiser's pooled tokens (lost to the multi-t readout in docs/ABLATIONS.md; off by default)")
    p.add_argument("--recon-steps", type=int, default=25, help="sampler steps of the reconstruction grid")
    p.set_defaults(func=probe_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        _main(build_parser().parse_args(argv))
    except DatasetError as e:  # e.g. a latent-trained run whose VAE folder is gone
        raise SystemExit(f"error: {e}") from None


def _main(args: argparse.Namespace) -> None:
    args.func(args)


if __name__ == "__main__":
    main()
