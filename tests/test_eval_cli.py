"""The evaluation CLIs: run_probe on a tiny untrained model, image grids, and eval/embed/sample end to end."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsemdiff import eval as eval_mod
from fastsemdiff.config import load_config
from fastsemdiff.data import DEFAULT_PATH, load_split
from fastsemdiff.eval import format_table, main as eval_main, run_probe
from fastsemdiff.models.semantic import SemanticDiffusion
from fastsemdiff.sample import grid_size, save_image_grid
from helpers import EVAL_FAST, exported_run, give_t_a_say, has_export, untrained_eval_model

FAST = EVAL_FAST
TS = [0.0, 0.5]

has_fmnist = pytest.mark.skipif(
    not Path(DEFAULT_PATH).is_dir(), reason=f"Fashion-MNIST not installed at {DEFAULT_PATH} (dataset-fashion-mnist)"
)


@pytest.fixture(scope="module")
def model():
    return untrained_eval_model()


@pytest.mark.parametrize("overrides, depends", [
    ([], False),  # fresh: adaLN weights zero, t cannot reach the blocks
    (["encoder.time_conditioned=false"], False),
    (["encoder.time_conditioned=false", "encoder.input=noisy"], True),  # x_t changes with t
    ("trained", True),
])
def test_embedding_depends_on_t_is_exact(overrides, depends):
    """The probe embeds a t-blind model once, so the flag must be exact: equal embeddings when False,
    different ones when True."""
    torch.manual_seed(1)
    m = SemanticDiffusion(load_config(None, FAST + (overrides if isinstance(overrides, list) else [])))
    if overrides == "trained":
        give_t_a_say(m)
    m.eval()
    images = (torch.rand(6, 1, 28, 28) * 255).to(torch.uint8)
    assert m.embedding_depends_on_t() is depends
    same = torch.equal(m.embed(images, 0.1), m.embed(images, 0.8))
    assert same is not depends


def _cheap_label_settings(monkeypatch):
    """The label stage's cross-validation over one scaling and two decays, for tests of its draws' bookkeeping (the
    choice itself is tested in tests/test_probe.py, and both scalings end to end in ``test_eval_probe_cli``)."""
    monkeypatch.setattr(eval_mod, "choose_probe_settings", functools.partial(
        eval_mod.choose_probe_settings, scalings=("standardised",), grid=(1e-4, 1e-2)))


def test_run_probe_embeds_a_t_blind_model_once(monkeypatch):
    _cheap_label_settings(monkeypatch)
    torch.manual_seed(0)
    fresh = SemanticDiffusion(load_config(None, FAST)).eval()
    gen = torch.Generator().manual_seed(3)
    train_x = (torch.rand(120, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
    test_x = (torch.rand(40, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
    train_y, test_y = torch.arange(120) % 4, torch.arange(40) % 4
    calls = []
    embed = fresh.embed
    fresh.embed = lambda *a, **k: calls.append(a[1]) or embed(*a, **k)
    result = run_probe(fresh, train_x, train_y, test_x, test_y, [0.0, 0.3, 0.9], batch_size=64, knn_k=5,
                       progress=False, with_baselines=False, label_sizes=(40,))  # 40: five draws, not 100's twenty
    assert calls == [0.0, 0.0]  # once per split
    assert result["multi_t"]["t_blind"] and result["multi_t"]["dim"] == 16
    assert len({r["linear"] for r in result["per_t"]}) == 1
    # its multi-t readout is that one embedding in the few-label probes too, not the embedding repeated per t
    # (the same 16 columns three times is another probe: the weight decay acts on three copies)
    assert result["label_efficiency"], result
    for rows in result["label_efficiency"].values():
        assert rows["embedding, multi-t"] == rows["embedding, best t"]


def test_multi_t_readout_concatenates_the_chosen_times_in_their_order(model):
    """eval.multi_ts picks the readout's times from the probed grid: its width, its features (z at those t,
    in that order, as embed_multi gives them) and its probe differ from the all-t concatenation."""
    gen = torch.Generator().manual_seed(4)
    train_x = (torch.rand(150, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
    test_x = (torch.rand(50, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
    train_y, test_y = torch.arange(150) % 3, torch.arange(50) % 3
    ts, pick = [0.0, 0.3, 0.6, 0.9], [0.9, 0.0]
    features: dict = {}
    # no label-efficiency stage: nothing here reads it, and its cross-validated probes were most of the time
    kw = dict(batch_size=64, knn_k=5, progress=False, with_baselines=False, label_sizes=())
    result = run_probe(model, train_x, train_y, test_x, test_y, ts, multi_ts=pick, features_out=features, **kw)
    assert result["multi_t"]["ts"] == pick and result["multi_t"]["dim"] == 2 * 16
    assert [r["t"] for r in result["per_t"]] == ts  # the curve still covers every probed t
    with torch.inference_mode():
        expected = model.embed_multi(test_x, pick, 64)
    torch.testing.assert_close(features["embedding, multi-t"][1], expected)
    every = run_probe(model, train_x, train_y, test_x, test_y, ts, **kw)
    assert every["multi_t"]["dim"] == 4 * 16 and every["multi_t"]["ts"] == ts
    one = run_probe(model, train_x, train_y, test_x, test_y, ts, multi_ts=[0.6], **kw)
    assert one["multi_t"]["linear"] == one["per_t"][2]["linear"] and one["multi_t"]["dim"] == 16
    with pytest.raises(ValueError, match="some of ts"):
        run_probe(model, train_x, train_y, test_x, test_y, ts, multi_ts=[0.5], **kw)


@pytest.mark.parametrize("cli_multi, cli_ts, cfg_multi, ts, expected", [
    (None, None, [], [0.0, 0.5], [0.0, 0.5]),  # nothing chosen: every probed t
    (None, None, [0.5], [0.0, 0.5], [0.5]),  # the config's grid
    ([0.0], None, [0.5], [0.0, 0.5], [0.0]),  # --multi-ts wins
    (None, [0.0, 0.2], [0.5], [0.0, 0.2], [0.0, 0.2]),  # --ts replaced the grid eval.multi_ts was chosen from
])
def test_multi_t_grid_resolution(cli_multi, cli_ts, cfg_multi, ts, expected):
    assert eval_mod.multi_t_grid(cli_multi, cli_ts, cfg_multi, ts) == expected


def test_multi_t_grid_outside_the_probed_times_is_a_clear_error(capsys):
    with pytest.raises(SystemExit, match=r"add them to --ts"):
        eval_mod.multi_t_grid([0.7], None, [], [0.0, 0.5])
    with pytest.raises(Exception, match="eval.multi_ts"):
        load_config(None, ["eval.ts=[0, 0.5]", "eval.multi_ts=[0.7]"])


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    """A run directory with an exported untrained model, as training would leave it."""
    return exported_run(model, tmp_path_factory.mktemp("run"))


@has_fmnist
def test_best_t_is_chosen_without_the_test_labels(model):
    """Scrambling the test labels changes every test accuracy but not which t is called best."""
    train_x, train_y = load_split("fashion-mnist", DEFAULT_PATH, "train", 28, 1)
    test_x, test_y = load_split("fashion-mnist", DEFAULT_PATH, "test", 28, 1)
    # no label-efficiency stage: it reads no t choice, and its cross-validated probes were most of this test's time
    kw = dict(batch_size=64, knn_k=5, progress=False, with_baselines=False, label_sizes=())
    a = run_probe(model, train_x[:240], train_y[:240], test_x[:120], test_y[:120], TS, **kw)
    scrambled = test_y[:120][torch.randperm(120, generator=torch.Generator().manual_seed(3))]
    b = run_probe(model, train_x[:240], train_y[:240], test_x[:120], scrambled, TS, **kw)
    assert a["best_t"]["t"] == b["best_t"]["t"]
    assert a["best_t"]["selection_val"] == b["best_t"]["selection_val"]
    assert [r["linear"] for r in a["per_t"]] != [r["linear"] for r in b["per_t"]]


@has_fmnist
def test_run_probe_fields_and_ranges(model):
    train_x, train_y = load_split("fashion-mnist", DEFAULT_PATH, "train", 28, 1)
    test_x, test_y = load_split("fashion-mnist", DEFAULT_PATH, "test", 28, 1)
    # no label-efficiency stage (test_eval_probe_cli checks it): its cross-validated probes took 3/4 of this test
    result = run_probe(model, train_x[:200], train_y[:200], test_x[:100], test_y[:100], TS, batch_size=64,
                       knn_k=5, progress=False, label_sizes=())
    assert [r["t"] for r in result["per_t"]] == TS
    accuracies = [v for r in result["per_t"] for k, v in r.items() if k != "t"]
    accuracies += [result[key][k] for key in ("best_t", "multi_t", "raw_pixels") for k in ("linear", "knn")]
    assert all(0.0 <= a <= 100.0 for a in accuracies)
    best = result["best_t"]  # chosen on held-out training images: the test split only reads its result
    val = [r["score"] for r in best["selection_val"]]
    assert [r["t"] for r in best["selection_val"]] == TS and best["selected_on"] == "held-out train"
    assert all(r["score"] == pytest.approx((r["linear"] + r["knn"]) / 2) for r in best["selection_val"])
    assert best["t"] == TS[val.index(max(val))]
    assert {k: best[k] for k in ("t", "linear", "knn")} == result["per_t"][TS.index(best["t"])]
    assert result["multi_t"]["ts"] == TS and result["multi_t"]["dim"] == len(TS) * 16
    assert result["embedding_dim"] == 16
    assert (result["n_train"], result["n_test"]) == (200, 100)
    assert result["seconds"] > 0
    assert result["raw_pixels"]["linear"] > 50  # pixels already separate Fashion-MNIST well
    assert result["label_efficiency"] == {}
    assert "z_plus_denoiser" not in result  # the readout that lost (docs/ABLATIONS.md) is asked for by name
    json.dumps(result)  # probe.json must be writable as is
    assert "multi-t" in format_table(result) and "pixels" in format_table(result)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid_size_and_mode(tmp_path, channels, mode):
    images = torch.rand(5, channels, 12, 10)
    path = tmp_path / "grid.png"
    save_image_grid(images, path, nrow=3)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == mode
        assert img.size == grid_size(5, 12, 10, nrow=3)
    assert grid_size(5, 12, 10, nrow=3) == (2 * (3 * 12 + 2), 2 * (2 * 14 + 2))


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    for command in (["probe", "--run", str(tmp_path)], ["probe", "--run", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit) as exc:
            eval_main(command)
        message = str(exc.value.code)
        assert "model.safetensors" in message and "--run" in message
    assert "train" in message or "does not exist" in message


@has_export
def test_missing_data_is_a_clear_error(model, tmp_path):
    from fastsemdiff.export import save_model

    cfg = load_config(None, FAST + [f"data.path={tmp_path / 'no-data'}"])
    save_model(model, cfg, tmp_path / "model.safetensors")
    with pytest.raises(SystemExit) as exc:
        eval_main(["probe", "--run", str(tmp_path), "--device", "cpu"])
    assert "Fashion-MNIST" in str(exc.value.code) and "does not exist" in str(exc.value.code)


@has_fmnist
@has_export
def test_eval_probe_cli(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_mod, "LABEL_DRAWS", 2)  # the draws' bookkeeping shows with 2; 5 cost 2.5x the probes
    monkeypatch.setattr(eval_mod, "LABEL_DRAWS_BY_SIZE", {})  # 2 of every size (the report's 20 of 100 labels)
    # two decays to cross-validate, not four: the choice itself is tested in tests/test_probe.py
    monkeypatch.setattr(eval_mod, "choose_probe_settings", functools.partial(eval_mod.choose_probe_settings,
                                                                             grid=(1e-4, 1e-2)))
    eval_main(["probe", "--run", str(run_dir), "--ts", "0", "0.5", "--device", "cpu", "--batch-size", "64",
               "--out", str(tmp_path), "--limit-train", "200", "--limit-test", "100", "--recon-steps", "2",
               "--baseline-run", f"static={run_dir}", "--z-plus-denoiser"])
    result = json.loads((tmp_path / "probe.json").read_text())
    assert {"per_t", "best_t", "multi_t", "raw_pixels", "embedding_dim", "n_train", "n_test", "seconds"} <= set(result)
    assert (result["n_train"], result["n_test"]) == (200, 100)
    assert result["commit"] == eval_mod.source_commit()  # None outside a git checkout
    note = eval_mod._report_note(result)
    assert "200 train / 100 test images" in note and (result["commit"] or "commit unknown") in note
    flat = eval_mod._flat_figures(result)
    assert flat["our multi-t readout (32-d), linear"] == result["multi_t"]["linear"]
    assert {"random conv 16-d, linear", "random conv 32-d, linear"} <= set(flat)
    for png in ("probe.png", "embedding-2d.png", "reconstructions.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
    b = result["baselines"]
    assert set(b) == {"pixel_pca", "untrained_encoder", "ddae", "static", "random_conv"}  # static: --baseline-run
    assert {c["dim"] for c in b["random_conv"].values()} == {16, 32}  # best t (16-d) and multi-t (2 x 16)
    # the DDAE row is DDAE's own probe (the z + denoiser readout computed after it must not overwrite it)
    from fastsemdiff import baselines as baselines_mod
    from fastsemdiff.probe import linear_probe
    (tr, ytr), (te, yte) = (load_split("fashion-mnist", DEFAULT_PATH, s, 28, 1) for s in ("train", "test"))
    loaded = eval_mod.load_run(str(run_dir), "cpu")
    with torch.inference_mode():
        f_tr = baselines_mod.ddae_features(loaded, tr[:200], b["ddae"]["t"], 64)[b["ddae"]["block"]]
        f_te = baselines_mod.ddae_features(loaded, te[:100], b["ddae"]["t"], 64)[b["ddae"]["block"]]
    assert b["ddae"]["linear"] == linear_probe(f_tr, ytr[:200], f_te, yte[:100], num_classes=10)["top1"]
    zd = result["z_plus_denoiser"]  # multi-t (0, 0.5) with one t's z replaced by the denoiser's tokens
    assert zd["dim"] == 16 + 32 and len(zd["ts"]) == 1 and zd["ts"][0] in (0.0, 0.5)
    assert (zd["ddae_block"], zd["ddae_t"]) == (b["ddae"]["block"], b["ddae"]["t"])
    assert {r["dropped_t"] for r in zd["selection_val_linear"]} == {0.0, 0.5}
    kept = max(zd["selection_val_linear"], key=lambda r: r["linear"])["dropped_t"]
    assert zd["ts"] == [t for t in (0.0, 0.5) if t != kept]  # chosen on held-out training images
    assert "embedding + denoiser" in result["label_efficiency"]["100"]
    rows = {r["readout"]: r for r in result["against_controls"]}
    assert set(rows) == {"embedding, best t", "embedding, multi-t"}  # no 48-d control: z + denoiser not compared
    for row in rows.values():
        assert set(row["metrics"]) == {"linear", "knn", "100"}
        for m in row["metrics"].values():
            assert m["beats"] == (m["ours"] > m["control"])
            assert m["lead"] == round(m["ours"] - m["control"], 2) and m["leads_by_required"] == (m["lead"] >= 1.0)
    assert result["controls_verdict"] == eval_mod.controls_verdict(result["against_controls"])
    assert b["pixel_pca"]["dim"] == 16 and 0 <= b["ddae"]["block"] < 2 and b["ddae"]["t"] in (0.0, 0.5)
    assert set(result["label_efficiency"]) == {"100"}  # 200 images hold too few per class for 1,000
    assert {"embedding, multi-t", "raw pixels", "pixel PCA", "DDAE", "static, multi-t", "untrained"} <= set(
        result["label_efficiency"]["100"])  # the untrained twin ignores t: one embedding, no multi-t
    each = result["label_efficiency_draws"]["100"]
    for name, mean in result["label_efficiency"]["100"].items():  # the mean of LABEL_DRAWS draws of labels
        assert len(each[name]) == eval_mod.LABEL_DRAWS and mean == pytest.approx(sum(each[name]) / len(each[name]))
    assert len(set(each["raw pixels"])) > 1, "every draw of the labelled images gave the same accuracy"
    decays = result["label_efficiency_weight_decay"]["100"]  # each draw's, by cross-validation on its labels
    assert set(decays) == set(each) and all(len(d) == eval_mod.LABEL_DRAWS for d in decays.values())
    from fastsemdiff.probe import LABEL_WEIGHT_DECAYS
    assert {wd for d in decays.values() for wd in d} <= set(LABEL_WEIGHT_DECAYS)
    scalings = result["label_efficiency_scaling"]["100"]  # chosen with the decay, draw by draw
    assert set(scalings) == set(each) and all(len(d) == eval_mod.LABEL_DRAWS for d in scalings.values())
    assert {sc for d in scalings.values() for sc in d} <= {"standardised", "one scale"}
    pick = baselines_mod.label_subsets(ytr[:200], (100,), seed=0)[100]  # draw 0 of raw pixels, by hand
    px_tr, px_te = baselines_mod.pixel_features(tr[:200], "cpu"), baselines_mod.pixel_features(te[:100], "cpu")
    assert each["raw pixels"][0] == linear_probe(px_tr[pick], ytr[:200][pick], px_te, yte[:100], num_classes=10,
                                                 weight_decay=decays["raw pixels"][0],
                                                 scaling=scalings["raw pixels"][0])["top1"]
    assert b["untrained_encoder"]["multi_t"]["t_blind"] and b["untrained_encoder"]["multi_t"]["dim"] == 16
    assert not b["static"]["multi_t"].get("t_blind")  # this "static" run is the t-dependent test model
    out = capsys.readouterr().out
    assert "best t" in out and "pixels" in out and "total" in out
    assert "ddae" in out and "labelled images" in out and "against random conv" in out
    assert "embedding + denoiser" in out
    (st,) = result["against_static"]  # "static" here is the test model itself: a lead of 0, short of +1
    assert st["ours"] == result["best_t"]["linear"] and st["static"] == b["static"]["best_t"]["linear"]
    assert st["lead"] == round(st["ours"] - st["static"], 2) and st["leads_by_required"] == (st["lead"] >= 1.0)
    assert st["static_run"] == "static" and st["readout"] == "embedding, best t"
    assert "time-conditioned (embedding, best t) against static (static) at 16-d" in out


@has_fmnist
@has_export
def test_embed_cli(run_dir, tmp_path):
    from fastsemdiff.embed import main as embed_main

    out = tmp_path / "z.npz"
    embed_main(["--run", str(run_dir), "--out", str(out), "--ts", "0", "0.3", "--limit", "10", "--device", "cpu"])
    data = np.load(out)
    assert data["z"].shape == (10, 2 * 16) and data["labels"].shape == (10,)
    assert data["ts"].tolist() == pytest.approx([0.0, 0.3])


@has_fmnist
@has_export
def test_sample_cli(run_dir, tmp_path):
    from fastsemdiff.sample import main as sample_main

    sample_main(["--run", str(run_dir), "--out", str(tmp_path), "--n", "4", "--steps", "2", "--device", "cpu"])
    with Image.open(tmp_path / "samples.png") as img:
        assert img.size == grid_size(4, 28, 28, nrow=2) and img.mode == "L"
    with Image.open(tmp_path / "reconstructions.png") as img:
        assert img.size == grid_size(8, 28, 28, nrow=2)


def _result_with_leads(leads: dict[str, float]) -> dict:
    """A probe result whose best-t readout leads its 128-d control by ``leads`` (metric -> points)."""
    control = {"linear": 85.0, "knn": 83.0, "1000": 78.0, "100": 68.0}
    ours = {k: control[k] + leads[k] for k in control}
    name, cname = "embedding, best t", "random conv, 128-d"
    return {"best_t": {"t": 0.0, "linear": ours["linear"], "knn": ours["knn"]}, "multi_t": {"dim": 384},
            "embedding_dim": 128,
            "baselines": {"random_conv": {"128": {"dim": 128, "linear": control["linear"], "knn": control["knn"],
                                                  "filters": 8}}},
            "label_efficiency": {n: {name: ours[n], cname: control[n]} for n in ("1000", "100")}}


def test_against_controls_states_the_one_point_lead():
    # 1.004 prints as 1.00 and passes; 0.99 is short by 0.01; a loss is short by more than a point
    result = _result_with_leads({"linear": 1.004, "knn": 0.99, "1000": 2.5, "100": -0.4})
    (row,) = eval_mod.against_controls(result)  # no 384-d control: the multi-t readout has no row
    m = row["metrics"]
    assert m["linear"]["lead"] == 1.0 and m["linear"]["leads_by_required"] and m["linear"]["short_by"] == 0.0
    assert m["knn"]["lead"] == 0.99 and not m["knn"]["leads_by_required"] and m["knn"]["short_by"] == 0.01
    assert m["knn"]["beats"]  # beats the control, but not by the required point
    assert m["1000"]["leads_by_required"] and m["1000"]["to_goal"] == pytest.approx(83.0 - 80.5)
    assert not m["100"]["beats"] and m["100"]["short_by"] == 1.4
    verdict = eval_mod.controls_verdict([row])
    assert not verdict["all_lead_by_required"] and verdict["required_lead"] == eval_mod.REQUIRED_LEAD == 1.0
    assert verdict["short"] == ["embedding, best t: knn (lead +0.99)", "embedding, best t: 100 (lead -0.40)"]
    result["against_controls"] = [row]
    result.update(per_t=[{"t": 0.0, "linear": 86.0, "knn": 84.0}], raw_pixels={"linear": 80, "knn": 80, "dim": 784})
    result["multi_t"].update(ts=[0.0], linear=86.0, knn=84.0)
    text = format_table(result)
    assert "knn 83.99 vs 83.00 beats by 0.99 (short of +1 by 0.01)" in text
    assert "100 67.60 vs 68.00 LOSES by 0.40 (short of +1 by 1.40)" in text and "linear 86.00 vs 85.00 beats by 1.00, goal" in text
    assert "on every metric: NO (embedding, best t: knn (lead +0.99)" in text


def test_against_static_compares_equal_widths_only():
    result = _result_with_leads({"linear": 1.0, "knn": 1.0, "1000": 1.0, "100": 1.0})  # best t: 86.0, 128-d
    static = {"best_t": {"t": 0.0, "linear": 85.2}, "multi_t": {"dim": 128, "t_blind": True}}
    result["baselines"]["static"] = static
    (st,) = eval_mod.against_static(result)
    assert (st["lead"], st["leads_by_required"], st["dim"], st["readout"]) == (0.8, False, 128, "embedding, best t")
    static["best_t"]["linear"] = 84.9
    assert eval_mod.against_static(result)[0]["leads_by_required"]
    static["multi_t"] = {"dim": 3 * 128, "ts": [0.0, 0.5, 1.0]}  # a t-dependent "static" run: one z is 128-d
    assert eval_mod.against_static(result)[0]["dim"] == 128
    static["multi_t"] = {"dim": 64, "t_blind": True}  # another width: no comparison
    assert eval_mod.against_static(result) == []
    del result["baselines"]["static"]
    assert eval_mod.against_static(result) == []


def test_against_static_compares_the_multi_t_code_with_a_static_code_of_its_width():
    result = _result_with_leads({"linear": 1.0, "knn": 1.0, "1000": 1.0, "100": 1.0})
    result["multi_t"].update(ts=[0.0, 0.5, 1.0], linear=88.4, knn=86.0)
    result.update(per_t=[{"t": 0.0, "linear": 86.0, "knn": 84.0}], raw_pixels={"linear": 80, "knn": 80, "dim": 784})
    multi = result["multi_t"]["linear"]
    width = result["multi_t"]["dim"]
    assert width != result["embedding_dim"]

    def static_run(linear: float, dim: int) -> dict:
        return {"best_t": {"t": 0.0, "linear": linear, "knn": 80.0},
                "multi_t": {"ts": [0.0], "dim": dim, "t_blind": True, "linear": linear, "knn": 80.0}}

    result["baselines"]["static"] = static_run(85.5, result["embedding_dim"])
    result["baselines"]["static-wide"] = static_run(multi - 1.3, width)
    result["baselines"]["staticky"] = static_run(0.0, width)  # not a static run's name: not compared
    compared = eval_mod.against_static(result)
    rows = {r["static_run"]: r for r in compared}
    assert set(rows) == {"static", "static-wide"}
    wide = rows["static-wide"]
    assert (wide["readout"], wide["dim"], wide["ours"], wide["lead"], wide["leads_by_required"]) == (
        "embedding, multi-t", width, multi, 1.3, True)
    assert rows["static"]["readout"] == "embedding, best t" and rows["static"]["lead"] == round(
        result["best_t"]["linear"] - 85.5, 2)
    text = eval_mod.format_table({**result, "against_static": compared})
    assert f"time-conditioned (embedding, multi-t) against static (static-wide) at {width}-d (linear)" in text
    assert "lead +1.30 (>= +1)" in text


def test_controls_verdict_passes_only_when_every_metric_leads_by_a_point():
    row = eval_mod.against_controls(_result_with_leads({"linear": 1.2, "knn": 3.0, "1000": 1.0, "100": 2.0}))
    assert eval_mod.controls_verdict(row) == {"required_lead": 1.0, "all_lead_by_required": True, "short": []}
    assert not eval_mod.controls_verdict([])["all_lead_by_required"]  # no control to compare: not a pass


def test_joint_label_probes_map_back_to_each_readout_and_draw(monkeypatch):
    """joint_labels=True: one linear_probes call per label size, every readout's draws in order, and each
    accuracy lands under its readout and draw (a stub returns the problem's index)."""
    gen = torch.Generator().manual_seed(0)
    n_train, n_test = 300, 50
    train_y, test_y = torch.arange(n_train) % 10, torch.arange(n_test) % 10
    feats = {"a": (torch.randn(n_train, 4, generator=gen), torch.randn(n_test, 4, generator=gen))}
    calls = []

    def fake_settings(trains, classes, joint, workers=1):  # the i-th problem's decay (a scaling by parity): the mapping shows
        assert joint
        return [("one scale" if i % 2 else "standardised", 0.5 * i) for i in range(len(trains))]

    def fake_probes(trains, tests, classes, weight_decay, max_iter, scaling):
        settings = fake_settings(trains, classes, True)  # each problem's own decay and scaling, in order
        assert weight_decay == [wd for _, wd in settings] and scaling == [sc for sc, _ in settings]
        calls.append((len(trains), [x.shape[1] for x, _ in trains], max_iter))
        assert all(xt.shape == (n_test, x.shape[1]) and torch.equal(yt, test_y) for (x, _), (xt, yt) in zip(trains, tests))
        assert all(x.shape[0] == 100 for x, _ in trains)  # 10 labelled images a class
        return [float(i) for i in range(len(trains))]

    class Model:
        device = torch.device("cpu")
        def embedding_depends_on_t(self):
            return False
        def embed(self, images, t, batch_size):
            return feats["a"][0] if images.shape[0] == n_train else feats["a"][1]

    monkeypatch.setattr(eval_mod, "linear_probes", fake_probes)
    monkeypatch.setattr(eval_mod, "choose_probe_settings", fake_settings)
    images = torch.zeros(n_train, 1, 28, 28, dtype=torch.uint8)
    result = run_probe(Model(), images, train_y, images[:n_test], test_y, [0.0], 64, 5, progress=False,
                       with_baselines=False, label_sizes=(100,), joint_labels=True)
    names = list(result["label_efficiency_draws"]["100"])
    assert names == ["embedding, best t", "embedding, multi-t", "raw pixels"]
    # the judged readouts (a margin compares them) get label_draws(100) draws, the context baseline LABEL_DRAWS
    counts = [eval_mod.label_draws(100)] * 2 + [eval_mod.LABEL_DRAWS]
    assert counts == [20, 20, 5]
    assert calls == [(sum(counts), [4] * 40 + [784] * 5, eval_mod.LABEL_MAX_ITER)]
    first = 0
    for name, D in zip(names, counts):
        assert result["label_efficiency_draws"]["100"][name] == [float(first + d) for d in range(D)]
        assert result["label_efficiency_weight_decay"]["100"][name] == [0.5 * (first + d) for d in range(D)]
        assert result["label_efficiency_scaling"]["100"][name] == [
            "one scale" if (first + d) % 2 else "standardised" for d in range(D)]
        assert result["label_efficiency"]["100"][name] == pytest.approx(first + (D - 1) / 2)
        first += D


def test_label_probes_draws_extend_the_reports_draws(monkeypatch):
    """``n_draws`` draws of the label-efficiency stage: draw k from seed k, so the first LABEL_DRAWS are the
    default call's own figures and decays."""
    _cheap_label_settings(monkeypatch)
    g = torch.Generator().manual_seed(5)
    y = torch.arange(400) % 10
    x = torch.randn(400, 8, generator=g) + torch.nn.functional.one_hot(y, 10)[:, :8] * 2.0
    feats = {"a": (x[:300], x[300:])}
    base = eval_mod.label_probes(eval_mod._Timer(), feats, y[:300], y[300:], (30,), 10, joint=False)
    more = eval_mod.label_probes(eval_mod._Timer(), feats, y[:300], y[300:], (30,), 10, joint=False,
                                 n_draws=eval_mod.LABEL_DRAWS + 2)
    assert len(more[1]["30"]["a"]) == eval_mod.LABEL_DRAWS + 2
    assert more[1]["30"]["a"][:eval_mod.LABEL_DRAWS] == base[1]["30"]["a"]
    assert more[2]["30"]["a"][:eval_mod.LABEL_DRAWS] == base[2]["30"]["a"]
    assert len(set(more[1]["30"]["a"])) > 1  # the draws differ


def test_label_probes_draw_twenty_of_100_labels_and_five_of_other_sizes(monkeypatch):
    """The report's draws go by size (``label_draws``): twenty of 100 labels, whose lead over a control one draw
    moves by more than a point, five of the others; draw k is seed k at every size, so the first five of 100 labels
    are what five draws gave."""
    _cheap_label_settings(monkeypatch)
    g = torch.Generator().manual_seed(6)
    y = torch.arange(400) % 10
    x = torch.randn(400, 8, generator=g) + torch.nn.functional.one_hot(y, 10)[:, :8] * 2.0
    feats = {"a": (x[:300], x[300:])}
    mean, each, decays, _ = eval_mod.label_probes(eval_mod._Timer(), feats, y[:300], y[300:], (30, 100), 10, joint=False)
    assert eval_mod.label_draws(100) == 20 and eval_mod.label_draws(30) == eval_mod.LABEL_DRAWS == 5
    assert len(each["100"]["a"]) == len(decays["100"]["a"]) == 20 and len(each["30"]["a"]) == 5
    assert mean["100"]["a"] == pytest.approx(sum(each["100"]["a"]) / 20)
    five = eval_mod.label_probes(eval_mod._Timer(), feats, y[:300], y[300:], (100,), 10, joint=False, n_draws=5)
    assert five[1]["100"]["a"] == each["100"]["a"][:5]
    # the report's text counts a result's own draws (an older report's five too), not today's constants
    assert eval_mod._draw_counts({"label_efficiency": mean, "label_efficiency_draws": each}, "100") == {"a": 20}
    assert eval_mod._draw_counts({"label_efficiency": five[0], "label_efficiency_draws": five[1]}, "100") == {"a": 5}
    assert eval_mod._draw_counts({"label_efficiency": mean}, "100") == {"a": 5}  # a report that kept no draws
    line = eval_mod._label_efficiency_line({"label_efficiency": mean, "label_efficiency_draws": each}, "100")
    assert "(mean of 20 draws): a " in line
    # readouts with different counts (the judged ones and the context baselines): each says its own
    mixed = {"label_efficiency": {"100": {"ours": 71.0, "pixels": 68.0}},
             "label_efficiency_draws": {"100": {"ours": [71.0] * 20, "pixels": [68.0] * 5}}}
    line = eval_mod._label_efficiency_line(mixed, "100")
    assert "ours 71.00 (20 draws), pixels 68.00 (5 draws)" in line and "mean of 20 draws" not in line
    assert "scaling" not in line  # a report from before the scaling was chosen says nothing of it
    mixed["label_efficiency_scaling"] = {"100": {"ours": ["one scale"] * 17 + ["standardised"] * 3,
                                                 "pixels": ["standardised"] * 5}}
    line = eval_mod._label_efficiency_line(mixed, "100")
    assert line.endswith("by cross-validation on its labels; one scale in: ours 17/20, pixels 0/5"), line

