"""scripts/readout_checks.py, the research checks behind docs/ABLATIONS.md's readout figures: each check run on a
small slice of an untrained model's features (or a short training run's checkpoints), reading the held-out split
and printing what the documents quote.

The checks are evaluation tooling: what they compute is ordinary tensor math over the package's embeddings, the
same on any torch the package supports, and they never run on the GPU machines. So this module is marked
``stack_independent``: the README's test command runs it on .venv and not again on .venv-gpu-image (the GPU
machines' stack), where every test whose subject depends on the torch or Triton version runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastsemdiff import eval as eval_mod
from fastsemdiff.config import load_config
from fastsemdiff.eval import run_probe
from fastsemdiff.models.semantic import SemanticDiffusion
from helpers import EVAL_FAST as FAST, exported_run, has_export, untrained_eval_model

pytestmark = pytest.mark.stack_independent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with an exported untrained model, as training would leave it."""
    return exported_run(untrained_eval_model(), tmp_path_factory.mktemp("run"))


@has_export
@pytest.mark.parametrize("check, lines, limit", [("best-t", 5, 2400), ("grids", 10, 1200), ("full-decay", 16, 1200),
                                                 ("similarity", 4, 1200)])
def test_readout_checks_script_reads_the_held_out_split(run_dir, check, lines, limit, monkeypatch, capsys):
    """scripts/readout_checks.py (docs/ABLATIONS.md's figures for the best t and the multi-t grids) on a small
    slice: one line per t, per 3-t grid or per readout and decay, each with a held-out figure. The similarity
    check runs as the script itself (a fresh interpreter); the others call its main() in this process."""
    argv = [check, str(run_dir), "--limit", str(limit)]
    if check == "similarity":
        import subprocess

        script = Path(__file__).resolve().parents[1] / "scripts" / "readout_checks.py"
        out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        stdout = out.stdout
    else:
        monkeypatch.setattr(sys, "argv", ["readout_checks.py", *argv])
        _readout_checks_module().main()
        stdout = capsys.readouterr().out
    rows = [r for r in stdout.splitlines() if "held-out" in r]
    assert len(rows) == lines, stdout


@has_export
def test_readout_checks_equal_width_keeps_every_readout_within_the_width(run_dir, monkeypatch, capsys):
    """The equal-width check (docs/ABLATIONS.md, "Equal width") at --width 32 on a 16-d code: each t's z, two
    means over t, the ten grids of two t and the two PCA projections, none wider than 32, each held-out and test."""
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "equal-width", str(run_dir), "--limit", "1200",
                                      "--width", "32"])
    _readout_checks_module().main()
    rows = [r for r in capsys.readouterr().out.splitlines() if "held-out" in r]
    widths = [int(r.split(" (")[-1].split("-d)")[0]) for r in rows]
    assert len(rows) == 5 + 2 + 10 + 2 and all(w <= 32 for w in widths), rows
    assert widths.count(32) == 12 and widths.count(16) == 7  # the grids and the projections; z and its means
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "equal-width", str(run_dir), "--limit", "300",
                                      "--width", "8"])
    with pytest.raises(SystemExit, match="16-d, wider than --width 8"):
        _readout_checks_module().main()


@has_export
def test_readout_checks_wide_keeps_every_readout_within_the_width(run_dir, monkeypatch, capsys):
    """The goal's readouts (docs/ABLATIONS.md, "The goal's widest readouts") at --width 128 on a 16-d code and a
    32-wide denoiser: z at the five t (80-d), at eight spaced t and at the five t and three between (128-d), and
    the five t with the denoiser's tokens (112-d), the tokens' block and t the report's own choice
    (``eval._select_ddae``); a width under five codes is refused with the width to pass."""
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "wide", str(run_dir), "--limit", "1200", "--width", "128"])
    _readout_checks_module().main()
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if "held-out linear" in r]
    widths = sorted(int(r.split(" (")[-1].split("-d)")[0]) for r in rows)
    assert widths == [80, 112, 128, 128], out
    model = eval_mod.load_run(str(run_dir))
    tr, ytr = eval_mod.load_data(model.cfg, "train", 1200)
    block, t, _ = eval_mod._select_ddae(eval_mod._Timer(), model, tr, ytr, list(_readout_checks_module().TS), 256,
                                        10, progress=False)
    assert f"denoiser tokens chosen as the report chooses them: block {block} at t = {t} (" in out, out
    assert f"+ denoiser block {block} at t = {t} (112-d)" in out, out
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "wide", str(run_dir), "--limit", "300", "--width", "64"])
    with pytest.raises(SystemExit, match="pass --width 80 or more"):
        _readout_checks_module().main()


@has_export
def test_readout_checks_few_label_reads_the_reports_own_figures(run_dir, monkeypatch, capsys):
    """The few-label check (docs/ABLATIONS.md, "The goal's widest readouts") on a slice hands the report's
    label-efficiency stage (``eval.label_probes``, run through ``run_probe`` by the report's tests) the very
    multi-t code ``run_probe`` hands it, with the same labels and sizes, and prints the stage's own figures. A
    recording stand-in for the stage shows both, without fitting the stage's 120 probes twice."""
    calls = []

    def recording_stage(timer, features, train_labels, test_labels, label_sizes, classes, joint, judged=None):
        calls.append({"features": features, "labels": (train_labels, test_labels), "sizes": tuple(label_sizes),
                      "joint": joint, "judged": judged})
        means = {str(n): {k: 10.0 + 7 * i + n / 1e3 + len(calls) for i, k in enumerate(features)}
                 for n in label_sizes}
        decays = {str(n): {k: [1e-3] for k in features} for n in label_sizes}
        return means, {}, decays, {}

    monkeypatch.setattr(eval_mod, "label_probes", recording_stage)
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "few-label", str(run_dir), "--limit", "1200"])
    readout_checks = _readout_checks_module()
    readout_checks.main()
    rows = [r for r in capsys.readouterr().out.splitlines() if " labels: " in r]
    assert len(rows) == 4 and sum("(80-d)" in r for r in rows) == 2, rows
    check = calls[0]
    for i, name in enumerate(check["features"]):  # the stage's figures, each under its readout's name
        for n in (100, 1000):
            printed = next(r for r in rows if r.startswith(name) and f", {n} labels: " in r)
            assert f" labels: {10.0 + 7 * i + n / 1e3 + 1:.2f} " in printed, printed
    model = eval_mod.load_run(str(run_dir))
    tr, ytr = eval_mod.load_data(model.cfg, "train", 1200)
    te, yte = eval_mod.load_data(model.cfg, "test", 1200)
    run_probe(model, tr, ytr, te, yte, list(readout_checks.TS), 256, 20, progress=False,
              with_baselines=False, multi_ts=list(readout_checks.MULTI_TS), joint_labels=False)
    report = calls[1]
    mine = next(v for k, v in check["features"].items() if "report's multi-t" in k)
    theirs = report["features"]["embedding, multi-t"]
    assert mine[0].shape[1] < 80 and all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert all(torch.equal(a, b) for a, b in zip(check["labels"], report["labels"]))
    assert check["sizes"] == report["sizes"] == (100, 1000) and check["joint"] is report["joint"] is False
    # the report's multi-t code gets the judged readouts' draws, as every readout of the check does
    assert check["judged"] is None and "embedding, multi-t" in report["judged"]


@has_export
def test_readout_checks_draws_reports_each_lead_with_its_spread(run_dir, monkeypatch, capsys):
    """The draws check hands the report's label-efficiency stage the best t's z, the multi-t code and their controls
    with --draws draws, and prints each lead over its control of the same role (128-d, 384-d) with one draw's
    spread and the report's first LABEL_DRAWS draws' lead; one draw is refused."""
    calls = []
    figures = {0: [70.0, 72.0, 71.0, 69.0, 73.0, 70.0], 1: [75.0] * 6, 2: [69.0, 70.0, 71.0, 70.0, 70.0, 72.0],
               3: [71.0] * 6}

    def recording_stage(timer, features, train_labels, test_labels, label_sizes, classes, joint, n_draws=None):
        calls.append({"names": list(features), "sizes": tuple(label_sizes), "n_draws": n_draws,
                      "widths": [f[0].shape[1] for f in features.values()]})
        return {}, {"100": {k: figures[i][:n_draws] for i, k in enumerate(features)}}, {}, {}

    monkeypatch.setattr(eval_mod, "label_probes", recording_stage)
    monkeypatch.setattr(eval_mod, "LABEL_DRAWS_BY_SIZE", {100: 5})  # a report of five draws, as the check was built on
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "draws", str(run_dir), "--limit", "300", "--draws", "6"])
    _readout_checks_module().main()
    out = capsys.readouterr().out
    assert calls[0]["names"] == ["z at t = 0.25", "multi-t", "random conv 128-d", "random conv 384-d"], calls
    assert calls[0]["sizes"] == (100,) and calls[0]["n_draws"] == 6 and calls[0]["widths"][2:] == [128, 384]
    # leads of the best t: 1, 2, 0, -1, 3, -2 (mean 0.5, sd 1.87); the report's five draws: 1.0
    assert ("z at t = 0.25 against random conv 128-d, 100 labels, 6 draws: 70.83 vs 70.33, lead +0.50 (sd of one "
            "draw's lead 1.87, standard error 0.76); the report's 5 draws: lead +1.00") in out, out
    assert "multi-t against random conv 384-d, 100 labels, 6 draws: 75.00 vs 71.00, lead +4.00 (sd of one draw's " \
           "lead 0.00" in out, out
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "draws", str(run_dir), "--limit", "300", "--draws", "1"])
    with pytest.raises(SystemExit, match="needs two draws"):
        _readout_checks_module().main()


@has_export
def test_readout_checks_narrow_probes_every_readout_held_out_then_on_test(run_dir, monkeypatch, capsys):
    """The narrow check hands the report's 100-label stage every readout of z's width with the control of that
    width: on held-out rows (draws of the fit rows, scored on the val rows), then on the test split, and prints each
    lead with how many draws chose one scale. A recording stand-in shows the rows and draws of each call; a ViT
    encoder has no pooled map, and the check says so."""
    calls = []

    def recording_stage(timer, features, train_labels, test_labels, label_sizes, classes, joint, n_draws=None):
        calls.append({"names": list(features), "rows": {f[0].shape[0] for f in features.values()},
                      "widths": {f[0].shape[1] for f in features.values()}, "n_draws": n_draws,
                      "labels": train_labels.shape[0]})
        each = {"100": {k: [60.0 + i + d for d in range(n_draws)] for i, k in enumerate(features)}}
        scalings = {"100": {k: ["one scale" if d % 2 else "standardised" for d in range(n_draws)] for k in features}}
        return {}, each, {}, scalings

    monkeypatch.setattr(eval_mod, "label_probes", recording_stage)
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "narrow", str(run_dir), "--limit", "300", "--draws", "4"])
    checks = _readout_checks_module()
    checks.main()
    out = capsys.readouterr().out
    assert "no pooled map: the encoder is a vit" in out, out
    held, test = calls
    names = [f"z at t = {t}" for t in checks.TS] + [f"mean of z over {g}" for g in checks.NARROW_MEANS]
    assert held["names"] == test["names"] == names + ["random conv 16-d"]
    assert held["widths"] == test["widths"] == {16}
    fit, val = eval_mod._held_out_split(300)
    assert held["rows"] == {len(fit)} and held["labels"] == len(fit) and held["n_draws"] == 2
    assert test["rows"] == {300} and test["n_draws"] == 4
    # the stand-in's readout i reads 60 + i + d at draw d: each lead over the control is constant
    assert "test, 100 labels, z at t = 0.0: 61.50, lead -8.00 (se 0.00); one scale in 2 of 4 draws" in out, out
    assert "held-out, 100 labels, z at t = 0.25: 61.50, lead -7.00 (se 0.00); one scale in 1 of 2 draws" in out, out
    assert sum(" held-out linear " in line for line in out.splitlines()) == len(names) + 1


def test_the_pooled_map_is_the_last_stage_averaged():
    """``pooled_map`` is the CNN encoder's last stage output, as ``embed`` computes it, averaged over space."""
    checks = _readout_checks_module()
    g = torch.Generator().manual_seed(7)
    cnn = SemanticDiffusion(load_config(None, FAST + ["encoder.arch=cnn", "encoder.conv_channels=[8,16]",
                                                      "encoder.conv_strides=[2,2]"])).eval()
    images = (torch.rand(6, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    seen = []
    hook = cnn.encoder.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.mean(dim=(2, 3))))
    cnn.embed(images, 0.5)
    hook.remove()
    pooled = checks.pooled_map(cnn, images, 0.5)
    assert pooled.shape == (6, 16) and torch.allclose(pooled, seen[0], atol=1e-6)


def _readout_checks_module():
    """scripts/readout_checks.py imported as a module (scripts/ is not a package)."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        import readout_checks
    finally:
        sys.path.remove(str(scripts))
    return readout_checks


def test_readout_checks_r_squared_is_one_for_a_linear_map_and_near_zero_for_independent_codes():
    readout_checks = _readout_checks_module()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 16, generator=g)
    mixed = a @ torch.randn(16, 8, generator=g) + 3.0
    noise = torch.randn(3000, 8, generator=g)
    fit, val = slice(0, 2000), slice(2000, 3000)
    assert readout_checks.r_squared(a[fit], mixed[fit], a[val], mixed[val]) == pytest.approx(1.0, abs=1e-9)
    assert abs(readout_checks.r_squared(a[fit], noise[fit], a[val], noise[val])) < 0.02
    half = mixed + noise * mixed.std(0)  # as much unpredictable variance as predictable: R^2 about 0.5
    assert readout_checks.r_squared(a[fit], half[fit], a[val], half[val]) == pytest.approx(0.5, abs=0.05)


def test_readout_checks_weights_reads_the_checkpoints_ema_and_raw_weights(trained_run):
    """The weights check (EMA against raw weights, docs/ABLATIONS.md) reads each checkpoint's EMA and raw
    weights: the last EMA is what training exported, the raw weights differ from it, and it prints one line
    per variant."""
    import subprocess

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    readout_checks = _readout_checks_module()
    model = eval_mod.load_run(str(trained_run.run_dir))
    saved = readout_checks._checkpoint_weights(trained_run.run_dir, model, last=2)
    assert [step for step, _, _ in saved] == [5, 10]
    _, raw, ema = saved[-1]
    assert set(ema) <= set(trained_run.exported) and len(ema) > 10  # the trained parameters (no fixed buffers)
    for name, value in ema.items():
        assert torch.equal(value, trained_run.exported[name]), name
    assert any(not torch.equal(raw[n], ema[n]) for n in ema)
    out = subprocess.run([sys.executable, str(scripts / "readout_checks.py"), "weights", str(trained_run.run_dir)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [r for r in out.stdout.splitlines() if "held-out" in r]
    assert [r.split(":")[0] for r in rows] == ["EMA at 10 (exported)", "raw at 10", "mean of the EMA at 5 and 10"]


def test_readout_checks_across_image_share_is_zero_per_dimension_and_one_per_entry():
    readout_checks = _readout_checks_module()
    g = torch.Generator().manual_seed(1)
    per_dim = torch.randn(1, 32, generator=g).expand(500, 32)
    assert readout_checks.across_image_share(per_dim) == pytest.approx(0.0, abs=1e-12)
    assert readout_checks.across_image_share(torch.randn(500, 32, generator=g)) == pytest.approx(1.0, abs=0.05)
    half = per_dim + torch.randn(500, 32, generator=g) * per_dim.std()  # as much per image as per dimension
    assert readout_checks.across_image_share(half) == pytest.approx(0.5, abs=0.08)


@has_export
@pytest.mark.parametrize("kl_variance, shares_zero", [("input", False), ("time", True), (None, None)])
def test_readout_checks_variance_reads_a_kl_run(kl_variance, shares_zero, tmp_path, monkeypatch, capsys):
    """The variance check (docs/ABLATIONS.md, "The bottleneck's variance per t"), run in this process: one line per
    t; a t-only log-variance changes with no image (share 0), a per-image head's does; a run without the KL is
    refused."""
    extra = [] if kl_variance is None else ["encoder.regularizer=kl", f"encoder.kl_variance={kl_variance}"]
    model = untrained_eval_model(*extra)
    if kl_variance == "time":
        with torch.no_grad():
            model.encoder.logvar.proj.weight.normal_(std=0.5)
    exported_run(model, tmp_path)
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "variance", str(tmp_path), "--limit", "300"])
    if kl_variance is None:
        with pytest.raises(SystemExit, match="encoder.regularizer=kl"):
            _readout_checks_module().main()
        return
    _readout_checks_module().main()
    out = capsys.readouterr().out
    shares = [float(r.split("share across images ")[1].split(",")[0]) for r in out.splitlines() if "t=" in r]
    assert len(shares) == 5 and all((s == 0.0) == shares_zero for s in shares), out
