"""Probe math on synthetic features: separable blobs are solved, random labels are not."""
from __future__ import annotations

import pytest
import torch

from fastsemdiff import probe as probe_mod
from fastsemdiff.probe import class_balanced_subset, knn_accuracy, linear_probe, plot_accuracy_vs_t, standardize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def blobs(n_per_class: int, classes: int = 10, dim: int = 50, spread: float = 6.0, means_seed: int = 0,
          noise_seed: int = 0):
    """Gaussian blobs (unit noise) around random class means; the same means_seed gives the same classes."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(means_seed)) * spread
    gen = torch.Generator().manual_seed(noise_seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    y = y[torch.randperm(len(y), generator=gen)]
    return means[y] + torch.randn(len(y), dim, generator=gen), y


@pytest.fixture(scope="module")
def separable():
    return (*blobs(100, noise_seed=1), *blobs(30, noise_seed=2))


def test_linear_probe_separates_blobs(separable):
    result = linear_probe(*separable)
    assert set(result) == {"top1", "train_top1"}
    assert result["top1"] > 95 and result["train_top1"] > 95


def test_linear_probe_is_deterministic_and_works_in_inference_mode(separable):
    first = linear_probe(*separable, max_iter=20)
    with torch.inference_mode():
        second = linear_probe(*separable, max_iter=20)
    assert first == second


def test_knn_separates_blobs(separable):
    assert knn_accuracy(*separable, k=20) > 95


def test_random_labels_give_chance():
    gen = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(1000, 50, generator=gen), torch.randn(500, 50, generator=gen)
    train_y, test_y = torch.randint(0, 10, (1000,), generator=gen), torch.randint(0, 10, (500,), generator=gen)
    assert linear_probe(train_x, train_y, test_x, test_y)["top1"] < 25
    assert knn_accuracy(train_x, train_y, test_x, test_y) < 25


def test_standardize_uses_train_statistics():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(500, 8, generator=gen, dtype=torch.float64) * 5 + 3
    train[:, 0] = 7.0  # a constant feature must stay finite
    test = torch.randn(50, 8, generator=gen) * 5 + 3
    s_train, s_test = standardize(train, test)
    assert s_train.dtype == s_test.dtype == torch.float32
    assert torch.allclose(s_train.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(s_train[:, 1:].std(0, correction=0), torch.ones(7), atol=1e-4)
    assert torch.isfinite(s_test).all()
    mean, std = train.float().mean(0), train.float().std(0, correction=0).clamp_min(1e-6)
    assert torch.allclose(s_test, (test - mean) / std, atol=1e-4)


def test_knn_k1_on_its_own_training_set_is_perfect():
    x, y = blobs(20, spread=0.5, noise_seed=4)  # overlapping classes: only the self-match makes it 100%
    assert knn_accuracy(x, y, x, y, k=1, chunk=64) == 100.0


def test_class_balanced_subset_counts():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 12)
    idx = class_balanced_subset(labels, per_class=5, seed=0)
    assert idx.dtype == torch.int64 and len(idx.unique()) == 15
    assert torch.bincount(labels[idx]).tolist() == [5, 5, 5]
    assert torch.equal(idx, class_balanced_subset(labels, per_class=5, seed=0))
    assert not torch.equal(idx, class_balanced_subset(labels, per_class=5, seed=1))
    with pytest.raises(ValueError, match="class 1"):
        class_balanced_subset(labels, per_class=8, seed=0)


def test_plot_writes_a_png(tmp_path):
    rows = [{"t": 0.0, "linear": 80.0, "knn": 78.0}, {"t": 0.3, "linear": 84.0, "knn": 81.0}]
    path = tmp_path / "acc.png"
    plot_accuracy_vs_t(rows, path, {"raw pixels": 84.2})
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_keeps_the_embedding_in_range_and_writes_the_note(tmp_path, monkeypatch):
    """A far lower curve (DDAE at large t) must not squash the embedding's rows to a line: the y-range is
    set by the rows and the t-free figures; the note is drawn under the axes."""
    import matplotlib.figure

    rows = [{"t": 0.0, "linear": 87.0, "knn": 84.0}, {"t": 1.0, "linear": 85.0, "knn": 83.5}]
    seen = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        seen["ylim"] = fig.axes[0].get_ylim()
        seen["texts"] = [t.get_text() for t in fig.texts]
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    plot_accuracy_vs_t(rows, tmp_path / "acc.png", {"random conv 384-d, linear": 88.4},
                       {"DDAE": [{"t": 0.0, "linear": 80.0}, {"t": 1.0, "linear": 10.0}]}, note="commit abc")
    lo, hi = seen["ylim"]
    assert 78.0 <= lo <= 83.5 and 88.4 < hi <= 100.0
    assert seen["texts"] == ["commit abc"]
    assert (tmp_path / "acc.png").read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------- many probes as one problem (label efficiency)
from fastsemdiff.probe import linear_probes  # noqa: E402


def _overlapping(n_per_class: int, dim: int, seed: int, shift: float = 3.0):
    """Blobs with some class overlap (spread ~ noise), so accuracies are far from 0 and 100 and a wrong
    solution shows; a constant column tests the std clamp, an offset tests the standardisation."""
    x, y = blobs(n_per_class, dim=dim, spread=0.6, means_seed=seed, noise_seed=seed + 100)
    xt, yt = blobs(40, dim=dim, spread=0.6, means_seed=seed, noise_seed=seed + 200)
    x[:, 0], xt[:, 0] = 2.0, 2.0  # constant in train (std clamped), the same in test
    return (x * 3 + shift, y), (xt * 3 + shift, yt)


def test_linear_probes_solve_each_problem_as_linear_probe_does():
    # widths 7, 72 and 33, rows 20, 100 and 50: padded to 72 x 100; converged, each is its own probe's optimum
    problems = [_overlapping(2, 7, 1), _overlapping(10, 72, 2), _overlapping(5, 33, 3)]
    want = [linear_probe(a[0], a[1], b[0], b[1], num_classes=10, max_iter=2000)["top1"] for a, b in problems]
    got = linear_probes([a for a, _ in problems], [b for _, b in problems], 10, max_iter=2000)
    assert got == pytest.approx(want, abs=1e-6)
    assert 15 < min(want) and max(want) < 99, f"{want}: the problems must be neither trivial nor hopeless"


def test_linear_probes_work_in_inference_mode_and_refuse_mismatches():
    problems = [_overlapping(3, 9, 4), _overlapping(3, 9, 5)]
    trains, tests = [a for a, _ in problems], [b for _, b in problems]
    first = linear_probes(trains, tests, 10, max_iter=30)
    with torch.inference_mode():
        assert linear_probes(trains, tests, 10, max_iter=30) == first
    with pytest.raises(ValueError, match="one test set per train set"):
        linear_probes(trains, tests[:1], 10)
    with pytest.raises(ValueError, match="same width"):
        linear_probes([trains[0]], [(tests[0][0][:, :5], tests[0][1])], 10)
    with pytest.raises(ValueError, match="same rows"):
        linear_probes([(trains[0][0], trains[0][1][:-1])], [tests[0]], 10)


# ----------------------------------------------------------- the few-label probes' weight decay
from fastsemdiff.probe import (LABEL_SCALINGS, LABEL_WEIGHT_DECAYS, _folds, choose_probe_settings,  # noqa: E402
                               one_scale)


def test_linear_probes_take_one_weight_decay_per_problem():
    problems = [_overlapping(4, 40, 6), _overlapping(4, 40, 7)]
    trains, tests = [a for a, _ in problems], [b for _, b in problems]
    want = [linear_probe(*a, *b, num_classes=10, weight_decay=wd, max_iter=2000)["top1"]
            for (a, b), wd in zip(problems, (1e-2, 3.0))]
    assert linear_probes(trains, tests, 10, weight_decay=[1e-2, 3.0], max_iter=2000) == pytest.approx(want, abs=1e-6)
    assert linear_probes(trains, tests, 10, weight_decay=3.0, max_iter=2000)[0] != pytest.approx(want[0], abs=1e-6)


def test_folds_cover_every_row_once():
    folds = _folds(10, 3)
    held = torch.cat([v for _, v in folds])
    assert sorted(held.tolist()) == list(range(10)) and len(folds) == 3
    for fit, val in folds:
        assert set(fit.tolist()).isdisjoint(val.tolist()) and len(fit) + len(val) == 10


def _noisy_problem(seed: int, d: int = 60, n: int = 60, signal: float = 1.0, flip: float = 0.25):
    """Two classes barely apart in d dimensions, a quarter of the labels flipped: how much decay is best
    differs from draw to draw, and a weak decay fits the flipped labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat(n // 2)
    u = torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g) + signal * (2 * y - 1)[:, None] * u / u.norm()
    return x, torch.where(torch.rand(n, generator=g) < flip, 1 - y, y)


@pytest.mark.parametrize("joint", [False, True])
def test_the_chosen_decay_is_the_best_mean_over_the_folds_of_the_problems_own_rows(joint):
    grid = (1e-4, 1e-2, 1.0, 10.0)
    problems = [_noisy_problem(s) for s in range(3)]
    chosen = [wd for _, wd in choose_probe_settings(problems, 2, scalings=("standardised",), grid=grid, joint=joint)]
    by_hand = []
    for x, y in problems:  # 3-fold cross-validation written out with the per-problem probe
        means = [sum(linear_probe(x[f], y[f], x[v], y[v], num_classes=2, weight_decay=wd, max_iter=100)["top1"]
                     for f, v in _folds(len(y), 3)) / 3 for wd in grid]
        by_hand.append(grid[means.index(max(means))])
    assert chosen == by_hand
    assert len(set(chosen)) > 1 and max(chosen) > grid[0], f"{chosen}: the problems must not all pick one decay"
    assert LABEL_WEIGHT_DECAYS == tuple(sorted(LABEL_WEIGHT_DECAYS))  # ascending: ties go to the weakest decay


def test_the_cross_validation_probes_run_on_one_thread_and_choose_alike_in_worker_processes(monkeypatch):
    """On a CPU the cross-validation's probes run on one thread each (two threads move a 100-row probe's accuracy
    by up to 0.3 point, enough to flip a choice, so the choice would depend on the machine), and the caller's thread
    count comes back; in ``workers`` processes every problem gets the choice it gets in one."""
    problems = [_noisy_problem(s, d=24, n=36) for s in range(4)]
    grid = (1e-4, 1.0)
    in_process = choose_probe_settings(problems, 2, grid=grid)
    assert len(set(in_process)) > 1, f"{in_process}: the problems must not all pick one setting"
    assert choose_probe_settings(problems, 2, grid=grid, workers=2) == in_process

    seen = []

    def counting_probe(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return linear_probe(*args, **kwargs)

    monkeypatch.setattr(probe_mod, "linear_probe", counting_probe)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert choose_probe_settings(problems, 2, grid=grid) == in_process
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 4 * 2 * len(grid) * 3 and set(seen) == {1}, set(seen)


# ----------------------------------------------------------- the few-label probes' feature scaling
def test_one_scale_keeps_the_features_relative_variance():
    """``one_scale`` centres by the train mean and divides every feature by one number, the train rows' RMS (a feature
    10x as spread stays so), where the standardisation gives each unit variance; the test rows get the train's."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 3, generator=g) * torch.tensor([1.0, 10.0, 0.1]) + 5.0
    a, b = one_scale(x, x[:50] + 1.0)
    assert torch.allclose(a.mean(0), torch.zeros(3), atol=1e-4) and a.pow(2).mean().item() == pytest.approx(1.0)
    ratio = a.std(0) / x.std(0)
    assert torch.allclose(ratio, ratio[0].expand(3))
    assert torch.allclose(b, a[:50] + 1.0 / (x - x.mean(0)).pow(2).mean().sqrt(), atol=1e-5)


def _signal_beside_noise(signal_spread: float, noise_spread: float, seed: int = 8):
    """Ten classes in ten features of one spread beside sixty features of noise of another."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(400) % 10
    signal = torch.nn.functional.one_hot(y, 10).float() + 0.3 * torch.randn(400, 10, generator=g)
    return torch.cat([signal * signal_spread, torch.randn(400, 60, generator=g) * noise_spread], 1), y


def test_a_probe_at_one_scale_is_the_probe_of_the_features_so_scaled():
    """``scaling="one scale"`` probes what ``one_scale`` gives (standardising that again would undo it, so the
    comparison is with the same probe's standardised figure, which differs on features of unequal spread), in
    ``linear_probe`` and per problem in ``linear_probes``."""
    x, y = _signal_beside_noise(10.0, 0.05)
    tr, te = (x[:100], y[:100]), (x[100:], y[100:])
    one = linear_probe(*tr, *te, num_classes=10, weight_decay=1e-2, max_iter=2000, scaling="one scale")["top1"]
    std = linear_probe(*tr, *te, num_classes=10, weight_decay=1e-2, max_iter=2000)["top1"]
    assert one > std + 5, "the scalings read these features alike: the test shows nothing"
    a, b = one_scale(tr[0], te[0])  # at one scale already, so one_scale leaves them as they are
    assert linear_probe(a, tr[1], b, te[1], num_classes=10, weight_decay=1e-2, max_iter=2000,
                        scaling="one scale")["top1"] == pytest.approx(one, abs=1e-6)
    joint = linear_probes([tr, tr], [te, te], 10, weight_decay=1e-2, max_iter=2000,
                          scaling=["one scale", "standardised"])
    assert joint == pytest.approx([one, std], abs=1e-6)
    with pytest.raises(ValueError, match="unknown feature scaling 'whitened'"):
        linear_probe(*tr, *te, num_classes=10, scaling="whitened")
    with pytest.raises(ValueError, match="2 scalings for 1 problems"):
        linear_probes([tr], [te], 10, scaling=["one scale", "standardised"])


@pytest.mark.parametrize("joint", [False, True])
def test_the_chosen_scaling_follows_where_the_class_signal_lies(joint):
    """Cross-validation keeps one scale when the classes live in widely spread features beside many narrow noisy
    ones (standardising would blow the noise up to the signal's size), and the standardisation when they live in
    narrow features beside widely spread noise; the choice is the best (scaling, decay) over the folds, as written
    out by hand, and ties go to the first scaling, the standardisation."""
    assert LABEL_SCALINGS[0] == "standardised"
    wide, narrow = _signal_beside_noise(10.0, 0.05), _signal_beside_noise(0.05, 10.0)
    problems = [(x[:100], y[:100]) for x, y in (wide, narrow)]
    chosen = choose_probe_settings(problems, 10, joint=joint)
    assert [sc for sc, _ in chosen] == ["one scale", "standardised"], chosen
    assert all(wd in LABEL_WEIGHT_DECAYS for _, wd in chosen)
    if not joint:
        for (x, y), pick in zip(problems, chosen):
            means = {(sc, wd): sum(linear_probe(x[f], y[f], x[v], y[v], num_classes=10, weight_decay=wd,
                                                max_iter=100, scaling=sc)["top1"] for f, v in _folds(100, 3)) / 3
                     for sc in LABEL_SCALINGS for wd in LABEL_WEIGHT_DECAYS}
            assert pick == max(means, key=means.get)
