"""The evaluation CLIs: run_probe on a tiny untrained model, image grids, and eval/embed/sample end to end."""
from __future__ import annotations

import functools
import importlib.util
import json
import sys
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

FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16", "model.patch_size=7"]
TS = [0.0, 0.5]

has_fmnist = pytest.mark.skipif(
    not Path(DEFAULT_PATH).is_dir(), reason=f"Fashion-MNIST not installed at {DEFAULT_PATH} (dataset-fashion-mnist)"
)
has_export = pytest.mark.skipif(
    importlib.util.find_spec("fastsemdiff.export") is None, reason="fastsemdiff.export (save_model) not there yet"
)


def give_t_a_say(model: SemanticDiffusion) -> SemanticDiffusion:
    """Random encoder adaLN weights, as training leaves them: at initialisation they are zero and z ignores t."""
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if "adaLN" in name and name.endswith("weight"):
                p.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return give_t_a_say(SemanticDiffusion(load_config(None, FAST))).eval()


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
    from fastsemdiff.export import save_model

    path = tmp_path_factory.mktemp("run")
    save_model(model, model.cfg, path / "model.safetensors")
    return path


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

    def fake_settings(trains, classes, joint):  # the i-th problem's decay (and a scaling by parity), so the mapping shows
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
    from fastsemdiff.export import save_model

    torch.manual_seed(0)
    extra = [] if kl_variance is None else ["encoder.regularizer=kl", f"encoder.kl_variance={kl_variance}"]
    model = give_t_a_say(SemanticDiffusion(load_config(None, [*FAST, *extra]))).eval()
    if kl_variance == "time":
        with torch.no_grad():
            model.encoder.logvar.proj.weight.normal_(std=0.5)
    save_model(model, model.cfg, tmp_path / "model.safetensors")
    monkeypatch.setattr(sys, "argv", ["readout_checks.py", "variance", str(tmp_path), "--limit", "300"])
    if kl_variance is None:
        with pytest.raises(SystemExit, match="encoder.regularizer=kl"):
            _readout_checks_module().main()
        return
    _readout_checks_module().main()
    out = capsys.readouterr().out
    shares = [float(r.split("share across images ")[1].split(",")[0]) for r in out.splitlines() if "t=" in r]
    assert len(shares) == 5 and all((s == 0.0) == shares_zero for s in shares), out
