"""Evaluation math on feature tensors: linear probe, weighted kNN, the accuracy-vs-t plot.

Nothing here knows about models, so embeddings, DDAE features and raw pixels all go through the same
code, and a baseline differs from the method only in its features.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

KNN_TEMPERATURE = 0.07  # InstDisc's temperature for turning cosine similarities into vote weights


# How a probe may scale its features by the train rows: "standardised", each feature to unit variance (the full-label
# probe's, always), or "one scale", every feature divided by one number, so the features keep their relative
# variances (a code's strong and weak directions). The few-label probes choose one of them by cross-validation on
# each draw's own labels, as they choose the weight decay: with 100 labels one scale reads a trained code 1.2-1.7
# points better and a random one 1.2-2.1 worse (docs/ABLATIONS.md, sixteenth session).
SCALINGS = ("standardised", "one scale")


def _check_scaling(name: str) -> str:
    if name not in SCALINGS:
        raise ValueError(f"unknown feature scaling {name!r}: use one of {list(SCALINGS)}")
    return name


def _train_statistics(train: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, divisor) of every feature of the train rows under ``scaling``. The divisor is clamped at 1e-6 so
    constant features (e.g. always-black border pixels) stay finite; one scale's is the RMS of the centred rows."""
    std, mean = torch.std_mean(train.float(), dim=0, correction=0)
    if _check_scaling(scaling) == "one scale":
        std = std.pow(2).mean().sqrt().expand_as(std)
    return mean, std.clamp_min(1e-6)


def scale_features(train: torch.Tensor, test: torch.Tensor,
                   scaling: str = "standardised") -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits scaled by the train statistics only, so the test set leaks nothing into the probe."""
    mean, divisor = _train_statistics(train, scaling)
    return (train.float() - mean) / divisor, (test.float() - mean) / divisor


def standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every feature to zero mean and unit variance by the train rows."""
    return scale_features(train, test, "standardised")


def one_scale(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred by the train mean, every feature divided by the train rows' RMS: relative variances kept."""
    return scale_features(train, test, "one scale")


def _num_classes(*labels: torch.Tensor) -> int:
    return int(max(int(y.max()) for y in labels if y.numel())) + 1


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: Optional[int] = None, weight_decay: float = 1e-4, max_iter: int = 150,
                 scaling: str = "standardised") -> dict:
    """Top-1 (%) of multinomial logistic regression on features scaled by the train rows (``scaling``, a name in
    ``SCALINGS``: each feature standardised, or all by ``one_scale``).

    Full-batch L-BFGS with a strong-Wolfe line search from a zero init: no learning rate, batch size or
    seed to tune, and the same features always give the same number. The loss is the mean cross-entropy
    plus ``weight_decay / 2 * ||W||^2`` (the bias is not penalised). Works inside ``inference_mode``.
    """
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    classes = num_classes or _num_classes(train_y, test_y)
    # Inference tensors cannot be saved for backward; outside inference mode, the scaling's out-of-place
    # ops give normal tensors, and the labels (saved by cross_entropy) are cloned into normal ones.
    with torch.inference_mode(False), torch.enable_grad():
        x, xt = scale_features(train_x, test_x, scaling)
        y, yt = train_y.long().clone().to(x.device), test_y.long().clone().to(xt.device)
        layer = torch.nn.Linear(x.shape[1], classes, device=x.device)
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
        opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter,
                                tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=False)
            loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return {"top1": _top1(layer(xt), yt), "train_top1": _top1(layer(x), y)}


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, chunk: int = 2048) -> float:
    """Top-1 (%) of the InstDisc weighted kNN: cosine neighbours, each voting with exp(sim / 0.07).

    Test rows go in chunks, so the similarity matrix held at once is only ``chunk x n_train``; its buffer
    is reused across chunks, which saves re-faulting hundreds of MB of fresh memory for every chunk.
    """
    train = F.normalize(train_x.float(), dim=1)
    labels = train_y.long().to(train.device)
    classes = _num_classes(train_y, test_y)
    k = min(k, train.shape[0])
    sims = torch.empty(min(chunk, test_x.shape[0]), train.shape[0], device=train.device)
    correct = 0
    for i in range(0, test_x.shape[0], chunk):
        query = F.normalize(test_x[i:i + chunk].float().to(train.device), dim=1)
        sim, idx = torch.mm(query, train.T, out=sims[:query.shape[0]]).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], classes, device=train.device)
        votes.scatter_add_(1, labels[idx], (sim / KNN_TEMPERATURE).exp())
        correct += (votes.argmax(dim=1).cpu() == test_y[i:i + chunk].cpu()).sum().item()
    return 100.0 * correct / max(1, test_x.shape[0])


def class_balanced_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``per_class`` random examples of every class, for label-efficiency probes."""
    labels = labels.cpu().long()
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has only {len(members)} examples, fewer than per_class={per_class}")
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks).sort().values


def plot_accuracy_vs_t(rows: list[dict], path: Union[str, Path], baselines: Optional[dict[str, float]] = None,
                       curves: Optional[dict[str, list[dict]]] = None, note: str = "") -> None:
    """PNG of linear-probe and kNN accuracy against t (rows of {t, linear, knn}); other methods' linear
    accuracy against t (``curves``: name -> rows of {t, linear}) dotted, t-free figures (baselines, controls,
    the multi-t readout) dashed; ``note`` (e.g. commit and images/s) under the axes. The y-range holds the
    embedding's rows and the t-free figures; a much lower curve (DDAE at large t) runs off the bottom."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede the pyplot import
    import matplotlib.pyplot as plt

    ts = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.plot(ts, [r["linear"] for r in rows], marker="o", label="linear probe")
    ax.plot(ts, [r["knn"] for r in rows], marker="s", label="kNN")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, other) in enumerate((curves or {}).items()):
        ax.plot([r["t"] for r in other], [r["linear"] for r in other], linestyle=":", marker=".",
                color=colors[(i + 2) % len(colors)], label=name)
    for i, (name, value) in enumerate((baselines or {}).items(), start=len(curves or {})):
        ax.axhline(value, linestyle="--", linewidth=1, color=colors[(i + 2) % len(colors)], label=name)
    shown = [r[k] for r in rows for k in ("linear", "knn")] + list((baselines or {}).values())
    top = max(shown + [v["linear"] for other in (curves or {}).values() for v in other])
    ax.set_ylim(max(0.0, min(shown) - 4.0), min(100.0, top + 1.5))
    ax.set_xlabel("diffusion time t (0 = clean)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs diffusion time" if curves else "Embedding accuracy vs diffusion time")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="x-small")
    if note:
        fig.text(0.01, 0.01, note, fontsize="x-small", color="0.3")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def linear_probes(train_sets: list[tuple[torch.Tensor, torch.Tensor]], test_sets: list[tuple[torch.Tensor, torch.Tensor]],
                  num_classes: int, weight_decay: Union[float, Sequence[float]] = 1e-4,
                  max_iter: int = 300, scaling: Union[str, Sequence[str]] = "standardised") -> list[float]:
    """Top-1 (%) of many independent linear probes solved as one problem: ``linear_probe`` for each
    (train_sets[i], test_sets[i]), with the same loss, standardisation (each by its own train rows) and
    zero init, but every problem's weights in one tensor and one L-BFGS run over the sum of their losses.

    The problems are separable, so the joint minimum is every problem's own minimum; what batching saves is
    launches and host synchronisations (the line search reads the loss every iteration), the cost of many
    small probes on a GPU (the label-efficiency stage: draws x sizes x readouts). Widths and row counts
    differ: features are zero-padded to the widest (a zero column stays zero after standardisation and its
    weight only decays) and rows to the longest, padded rows weighing nothing, so each problem's loss is its
    own mean. ``max_iter`` is higher than ``linear_probe``'s because one step size serves every problem.
    ``weight_decay`` and ``scaling``: one for all problems, or one per problem.
    """
    if len(train_sets) != len(test_sets) or not train_sets:
        raise ValueError("linear_probes needs one test set per train set, and at least one of each")
    for (x, y), (xt, yt) in zip(train_sets, test_sets):
        if x.shape[0] != y.shape[0] or xt.shape[0] != yt.shape[0] or x.shape[1] != xt.shape[1]:
            raise ValueError("each problem's features and labels must have the same rows, train and test the "
                             "same width")
    dev = train_sets[0][0].device
    P = len(train_sets)
    scalings = [scaling] * P if isinstance(scaling, str) else list(scaling)
    if len(scalings) != P:
        raise ValueError(f"linear_probes got {len(scalings)} scalings for {P} problems")
    for name in set(scalings):
        _check_scaling(name)
    width = max(x.shape[1] for x, _ in train_sets)
    rows = max(x.shape[0] for x, _ in train_sets)
    with torch.inference_mode(False), torch.enable_grad():
        xs = torch.zeros(P, rows, width, device=dev)
        ys = torch.zeros(P, rows, dtype=torch.long, device=dev)
        weights = torch.zeros(P, rows, device=dev)  # 1 / n on a problem's own rows, 0 on padding
        means, stds = torch.zeros(P, width, device=dev), torch.ones(P, width, device=dev)
        for p, (x, y) in enumerate(train_sets):
            n, d = x.shape
            x = x.float().to(dev)
            means[p, :d], stds[p, :d] = _train_statistics(x, scalings[p])
            xs[p, :n, :d] = (x - means[p, :d]) / stds[p, :d]
            ys[p, :n] = y.long().to(dev)
            weights[p, :n] = 1.0 / n
        decay = torch.as_tensor(weight_decay, dtype=torch.float32, device=dev).expand(P).reshape(P, 1, 1)
        W = torch.zeros(P, width, num_classes, device=dev, requires_grad=True)
        b = torch.zeros(P, 1, num_classes, device=dev, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=False)
            ce = F.cross_entropy((torch.baddbmm(b, xs, W)).flatten(0, 1), ys.flatten(), reduction="none")
            loss = (ce * weights.flatten()).sum() + 0.5 * (decay * W.pow(2)).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            accs = []
            for p, (xt, yt) in enumerate(test_sets):
                d = xt.shape[1]
                logits = ((xt.float().to(dev) - means[p, :d]) / stds[p, :d]) @ W[p, :d] + b[p]
                accs.append(_top1(logits, yt.long().to(dev)))
    return accs


# The few-label probes' weight decays, and how they are chosen: a probe of 1,000 labelled images in 128 or more
# dimensions overfits at a small fixed decay, and by how much depends on the features, so one fixed value
# favours some features over others; a user with only those labels would cross-validate on them.
LABEL_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
LABEL_CV_FOLDS = 3
LABEL_CV_ITER = 100  # within 0.04 point of 150 iterations on these problems (docs/ABLATIONS.md, label efficiency)
LABEL_SCALINGS = SCALINGS  # ... and their feature scaling, chosen the same way (ties: the standardisation)


def _folds(n: int, folds: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fit, held-out) row indices of ``folds``-fold cross-validation over ``n`` rows, shuffled by ``seed``."""
    parts = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).chunk(folds)
    return [(torch.cat([q for j, q in enumerate(parts) if j != k]), parts[k]) for k in range(len(parts))]


def _cv_scores(x: torch.Tensor, y: torch.Tensor, split: list, settings: list, num_classes: int,
               max_iter: int) -> list[float]:
    """One problem's mean held-out top-1 under each (scaling, decay) of ``settings``, over the folds of ``split``,
    every probe on one intra-op thread: the choice then reads the same on any machine, thread count and number of
    workers (two threads move a 100-row probe's accuracy by up to 0.3 point)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [sum(linear_probe(x[f], y[f], x[v], y[v], num_classes=num_classes, weight_decay=wd, max_iter=max_iter,
                                 scaling=scaling)["top1"] for f, v in split) / len(split) for scaling, wd in settings]
    finally:
        torch.set_num_threads(threads)


def _as_arrays(job: tuple) -> tuple:
    x, y, split, *rest = job
    return (x.float().numpy(), y.numpy(), [(f.numpy(), v.numpy()) for f, v in split], *rest)


def _cv_scores_of_arrays(job: tuple) -> list[float]:
    """``_cv_scores`` of a job sent as ``_as_arrays`` made it, in a worker process."""
    x, y, split, *rest = job
    return _cv_scores(torch.from_numpy(x), torch.from_numpy(y),
                      [(torch.from_numpy(f), torch.from_numpy(v)) for f, v in split], *rest)


def choose_probe_settings(train_sets: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                          scalings: Sequence[str] = LABEL_SCALINGS, grid: Sequence[float] = LABEL_WEIGHT_DECAYS,
                          folds: int = LABEL_CV_FOLDS, max_iter: int = LABEL_CV_ITER,
                          joint: bool = False, workers: int = 1) -> list[tuple[str, float]]:
    """For each (features, labels) problem, the (scaling, weight decay) of ``scalings`` x ``grid`` whose probe scores
    the best mean top-1 over ``folds``-fold cross-validation on that problem's own rows (the first of equals, so
    the first scaling and the smallest decay win ties). No other labels are read. ``joint``: every problem and
    fold of one setting as one ``linear_probes`` solve (a GPU's way); otherwise one single-threaded
    ``linear_probe`` each (a CPU's), the problems shared among ``workers`` processes when more than one: these
    probes are too small for threads to help (Python runs L-BFGS's line search), so a 2-core CPU chooses ~2x
    sooner in two processes, with the same choices as in one."""
    splits = [_folds(x.shape[0], folds) for x, _ in train_sets]
    settings = [(scaling, wd) for scaling in scalings for wd in grid]
    for scaling in scalings:
        _check_scaling(scaling)
    if joint:
        scores = [[0.0] * len(settings) for _ in train_sets]
        for g, (scaling, wd) in enumerate(settings):
            fits = [((x[f], y[f]), (x[v], y[v])) for (x, y), split in zip(train_sets, splits) for f, v in split]
            # one step size serves every problem: twice the iterations (as LABEL_MAX_ITER is to 150)
            accs = linear_probes([a for a, _ in fits], [b for _, b in fits], num_classes, weight_decay=wd,
                                 max_iter=2 * max_iter, scaling=scaling)
            k = 0
            for p, split in enumerate(splits):
                scores[p][g] = sum(accs[k:k + len(split)]) / len(split)
                k += len(split)
    else:
        jobs = [(x, y, split, settings, num_classes, max_iter) for (x, y), split in zip(train_sets, splits)]
        if (workers > 1 and len(jobs) > 1 and "fork" in multiprocessing.get_all_start_methods()
                and all(x.device.type == "cpu" for x, _ in train_sets)):
            # forked: the workers start at once with the features and the package already in memory (spawned ones
            # would import torch again, and the caller's main module). Each sets one thread before its first op,
            # which keeps a fork of a process whose OpenMP threads have run safe, as in DataLoader's workers.
            # The jobs travel as numpy arrays, pickled by value: torch's own pickling would move every tensor into
            # shared memory behind a file descriptor, a thousand of them for one report.
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
                scores = list(pool.map(_cv_scores_of_arrays, [_as_arrays(job) for job in jobs]))
        else:
            scores = [_cv_scores(*job) for job in jobs]
    return [settings[max(range(len(settings)), key=lambda g: row[g])] for row in scores]
