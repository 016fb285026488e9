"""Training on VAE latents: extraction (shapes, scaling, flips, an interrupted run continued, 2 ranks under
torchrun), training and exact resume on them (device-resident and memory-mapped give the same batches),
embedding from images and from latents, the probe and samples decoded through the VAE, and the bad inputs.

The VAE is a tiny randomly initialised diffusers AutoencoderKL (28x28x1 -> 4x14x14) saved to a temporary
folder and loaded from there; nothing is fetched (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers", reason="pip install diffusers (the dev extras have it)")

import fastsemdiff  # noqa: E402
import fastsemdiff.latents as latents_mod  # noqa: E402
import fastsemdiff.train as train_mod  # noqa: E402
from conftest import FAST, PYTHON, REPO, run_cmd  # noqa: E402
from fastsemdiff.config import load_config  # noqa: E402
from fastsemdiff.data import DatasetError, LatentShards, build_train_data, resolve_latents_config  # noqa: E402
from fastsemdiff.data.latent_data import DeviceLatents, MmapLatentStream  # noqa: E402
from fastsemdiff.data.latent_store import shard_file  # noqa: E402
from fastsemdiff.vae import VAEError, load_vae, vae_hash  # noqa: E402

N_TRAIN, N_TEST, SHARD, BATCH = 96, 32, 40, 16
SCALE, SHIFT = 0.5, 0.1  # not the VAE defaults, so the test sees them applied
FP16_RTOL = 2.0 ** -10  # one fp16 rounding (2^-11) with room for a last-bit difference of the fp32 encode


def make_vae(folder: Path, seed: int = 0) -> Path:
    """The README's test VAE (scripts/make_test_vae.py), with a scaling and shift of its own."""
    spec = importlib.util.spec_from_file_location("make_test_vae", REPO / "scripts" / "make_test_vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_test_vae(folder, channels=1, seed=seed, scaling_factor=SCALE, shift_factor=SHIFT)


@pytest.fixture(scope="session", autouse=True)
def one_thread_session():
    """One intra-op thread also for the session fixtures (set up before conftest's module-scoped one): two
    threads on 2 shared cores ran the VAE about 30 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    return make_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="session")
def images_npz(tmp_path_factory) -> Path:
    """Random images with structure (a per-class brightness), so latents are not all alike."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("images") / "images.npz"
    arrays = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 120, (n, 28, 28)) + 40 * y[:, None, None]
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x.astype(np.uint8), y
    np.savez(path, **arrays)
    return path


def extract_args(vae: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["--vae", str(vae), "--out", str(out), "--shard-size", str(SHARD), "--batch-size", str(BATCH),
            "--no-progress", "--threads", "1", *extra, "data.source=npz", f"data.path={data}"]


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, vae_dir, images_npz) -> Path:
    out = tmp_path_factory.mktemp("latents") / "lat"
    latents_mod.main(extract_args(vae_dir, out, images_npz, "--flip"))
    return out


def latent_train_args(run: Path, lat: Path, *extra: str) -> list[str]:
    return [*FAST, "model.patch_size=7", f"train.run_dir={run}", "data.source=latents", f"data.path={lat}", *extra]


@pytest.fixture(scope="session")
def latent_run(tmp_path_factory, extracted) -> Path:
    run = tmp_path_factory.mktemp("latent-run") / "run"
    train_mod.main(latent_train_args(run, extracted, "train.steps=6", "train.ckpt_every=3"))
    return run


def reference_latents(vae_dir: Path, images: np.ndarray, flip: bool = False) -> np.ndarray:
    """(mean - shift) * scale of diffusers' own encode, in fp32."""
    vae = diffusers.AutoencoderKL.from_pretrained(str(vae_dir), low_cpu_mem_usage=False).eval()
    x = torch.from_numpy(images).float()[:, None] / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x.flip(-1) if flip else x).latent_dist.mean
    return ((mean - SHIFT) * SCALE).numpy()


def assert_fp16_close(stored: np.ndarray, ref: np.ndarray) -> None:
    assert stored.dtype == np.float16 and stored.shape == ref.shape
    np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=FP16_RTOL, atol=FP16_RTOL * np.abs(ref).max())


def assert_same_arrays(a: np.ndarray, b: np.ndarray, name: str) -> None:
    """Equal labels; latents equal up to a last-bit difference of fp16 (the fp32 encode may round apart)."""
    assert a.dtype == b.dtype and a.shape == b.shape, name
    a, b = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(a, b, rtol=FP16_RTOL, atol=FP16_RTOL * np.abs(b).max(), err_msg=name)


def all_shard_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {f.name: np.load(f) for f in sorted(folder.glob("*.npy"))}


# ------------------------------------------------------------------------------------------ extraction
def test_extraction_shapes_scaling_flips_and_manifest(extracted, vae_dir, images_npz):
    m = json.loads((extracted / "manifest.json").read_text())
    assert m["complete"] and m["flipped"] and m["shard_size"] == SHARD
    assert m["vae"] == {"path": str(vae_dir.resolve()), "hash": vae_hash(vae_dir), "class": "AutoencoderKL",
                        "scaling_factor": SCALE, "shift_factor": SHIFT}
    assert (m["latent"]["channels"], m["latent"]["size"], m["latent"]["dtype"]) == (4, 14, "float16")
    assert (m["image"]["channels"], m["image"]["size"], m["image"]["source"]) == (1, 28, "npz")
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": N_TRAIN, "test": N_TEST}
    assert "--flip" in m["command"]
    # shards: 40, 40, 16 train images and one of 32 test images, memory-mappable
    assert [np.load(shard_file(extracted, "train", k, "latents"), mmap_mode="r").shape[0] for k in range(3)] == \
        [40, 40, 16]
    assert not shard_file(extracted, "train", 3, "latents").exists()
    raw = np.load(images_npz)
    for split in ("train", "test"):
        shards = LatentShards(extracted, split)
        assert_fp16_close(shards.all_latents(), reference_latents(vae_dir, raw[f"x_{split}"]))
        assert_fp16_close(shards.all_latents(True), reference_latents(vae_dir, raw[f"x_{split}"], flip=True))
        np.testing.assert_array_equal(shards.labels, raw[f"y_{split}"])
    # the scaling matters: stored latents are not the raw means
    raw_mean = reference_latents(vae_dir, raw["x_test"]) / SCALE + SHIFT
    assert np.abs(LatentShards(extracted, "test").all_latents().astype(np.float32) - raw_mean).max() > 0.05


def test_scaling_override_and_no_flips(tmp_path, vae_dir, images_npz):
    out = tmp_path / "lat"
    latents_mod.main(extract_args(vae_dir, out, images_npz, "--scaling-factor", "2.0", "--shift-factor", "0",
                                  "--splits", "test"))
    m = json.loads((out / "manifest.json").read_text())
    assert (m["vae"]["scaling_factor"], m["vae"]["shift_factor"], m["flipped"]) == (2.0, 0.0, False)
    assert set(m["splits"]) == {"test"} and not list(out.glob("*.flipped.npy"))
    ref = (reference_latents(vae_dir, np.load(images_npz)["x_test"]) / SCALE + SHIFT) * 2.0
    assert_fp16_close(LatentShards(out, "test").all_latents(), ref)


def test_interrupted_extraction_continues_where_it_stopped(tmp_path, vae_dir, images_npz, extracted, monkeypatch,
                                                           capsys):
    """A run stopped inside its third shard (after two were written) leaves a manifest marked unfinished and
    a half-written temporary file; the same command then encodes only the missing shards, and the result is
    the uninterrupted extraction's."""
    out = tmp_path / "lat"
    args = extract_args(vae_dir, out, images_npz, "--flip")
    real, calls = latents_mod.save_array, []

    def dying_save(path, array):
        if len(calls) == 6:  # shards 0 and 1 (latents, flipped, labels) are whole: die writing shard 2
            Path(path).with_name(f".{Path(path).name}.tmp99999").write_bytes(b"\x93NUMPY half")
            raise KeyboardInterrupt("killed")
        calls.append(path)
        real(path, array)

    monkeypatch.setattr(latents_mod, "save_array", dying_save)
    with pytest.raises(KeyboardInterrupt):
        latents_mod.main(args)
    monkeypatch.setattr(latents_mod, "save_array", real)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(DatasetError, match="did not finish.*run its command again"):
        LatentShards(out, "train")
    kept = {p: p.stat().st_mtime_ns for p in calls}

    capsys.readouterr()
    latents_mod.main(args)
    assert "train 96 (1 shard(s) encoded now), test 32 (1 shard(s) encoded now)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in calls} == kept, "finished shards were encoded again"
    assert not list(out.glob(".*tmp*")), "the stale temporary file was left behind"
    assert json.loads((out / "manifest.json").read_text())["complete"]
    a, b = all_shard_arrays(out), all_shard_arrays(extracted)
    assert set(a) == set(b)
    for name in a:
        assert_same_arrays(a[name], b[name], name)


def test_rerun_redoes_a_truncated_shard(tmp_path, vae_dir, images_npz, extracted, capsys):
    out = tmp_path / "lat"
    shutil.copytree(extracted, out)
    victim = shard_file(out, "train", 1, "latents")
    victim.write_bytes(victim.read_bytes()[:500])
    with pytest.raises(DatasetError, match=r"train-00001\.latents\.npy is truncated.*run the extraction again"):
        LatentShards(out, "train")
    capsys.readouterr()
    latents_mod.main(extract_args(vae_dir, out, images_npz, "--flip"))
    assert "train 96 (1 shard(s) encoded now), test 32 (0 shard(s) encoded now)" in capsys.readouterr().out
    assert len(LatentShards(out, "train")) == N_TRAIN


@pytest.mark.slow
def test_two_rank_extraction_under_torchrun(tmp_path, vae_dir, images_npz, extracted):
    out = tmp_path / "lat"
    # torchrun through this interpreter (the torchrun script's shebang may name another environment)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           "--max-restarts", "0", "-m", "fastsemdiff.latents", *extract_args(vae_dir, out, images_npz, "--flip")]
    r = run_cmd(cmd, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    # rank 0 encodes train shards 0 and 2 and the test shard, rank 1 train shard 1; rank 0 reports its own
    assert "train 96 (2 shard(s) encoded now), test 32 (1 shard(s) encoded now)" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["command"].startswith("torchrun")
    a, b = all_shard_arrays(out), all_shard_arrays(extracted)
    assert set(a) == set(b)
    for name in a:
        assert_same_arrays(a[name], b[name], name)


def test_cli_error_exits_2_without_traceback(tmp_path, images_npz):
    r = run_cmd([PYTHON, "-m", "fastsemdiff.latents", "--vae", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o"), "data.source=npz", f"data.path={images_npz}"], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fastsemdiff.latents: error: VAE folder" in r.stderr and "does not exist" in r.stderr


# -------------------------------------------------------------------------------------- training data
@pytest.mark.parametrize("world", [1, 2])
def test_device_and_memory_mapped_batches_are_identical(extracted, world):
    shards = LatentShards(extracted, "train")
    lat = torch.from_numpy(shards.all_latents())
    flp = torch.from_numpy(shards.all_latents(True))
    dev = DeviceLatents(lat, flp, torch.from_numpy(shards.labels))
    b = 16 // world
    for rank in range(world):
        stream = MmapLatentStream(shards, batch_size=b, rank=rank, world_size=world, seed=3, hflip=True,
                                  device=torch.device("cpu"))
        try:
            for step in (0, 1, 2, 5, 6, 13, 2):  # across epochs (6 steps each), and back (no hidden state)
                x1, y1 = dev.batch(step, b, rank, world, seed=3, hflip=True)
                x2, y2 = stream.batch(step)
                assert torch.equal(x1, x2) and torch.equal(y1, y2), (rank, step)
        finally:
            stream.close()
    # the flips take the stored flipped copies: some rows of a batch come from them, some not
    x, _ = dev.batch(0, 16, 0, 1, seed=3, hflip=True)
    index, _ = dev._epoch_draws(3, 0, 0, 1, 16, True)
    from_flipped = [bool(torch.equal(x[i], flp[index[0][i]].float())) for i in range(16)]
    assert 0 < sum(from_flipped) < 16


def test_ranks_cover_an_epoch_without_overlap(extracted):
    shards = LatentShards(extracted, "train")
    seen = []
    for rank in range(2):
        s = MmapLatentStream(shards, batch_size=8, rank=rank, world_size=2, seed=0, hflip=False,
                             device=torch.device("cpu"))
        seen += [y for step in range(6) for y in s.batch(step)[0].flatten(1).sum(1).tolist()]
        s.close()
    assert len(set(seen)) == 96  # every latent once (their sums are distinct)


def test_resident_auto_streams_when_the_latents_do_not_fit(extracted, monkeypatch):
    cfg = resolve_latents_config(load_config(None, latent_train_args(Path("unused"), extracted)))
    notes = []
    build = lambda: build_train_data(cfg.data, batch_size=8, rank=0, world_size=1, seed=0,  # noqa: E731
                                     device=torch.device("cpu"), say=notes.append, latents=cfg.latents)
    assert build().name == "device"
    monkeypatch.setattr("fastsemdiff.data.latent_data.free_memory", lambda device: 1000)
    data = build()
    assert data.name == "latents-mmap" and "streamed from memory-mapped shards" in notes[-1]
    data.close()


# ------------------------------------------------------------------------------------------- training
def test_training_on_latents_takes_the_manifest_shape(latent_run, extracted, vae_dir):
    cfg = load_config(str(latent_run / "config.yaml"))
    assert (cfg.latents.channels, cfg.latents.size, cfg.latents.vae) == (4, 14, str(vae_dir.resolve()))
    assert (cfg.latents.scaling_factor, cfg.latents.shift_factor, cfg.latents.vae_hash) == \
        (SCALE, SHIFT, vae_hash(vae_dir))
    model = fastsemdiff.load(latent_run, device="cpu")
    assert model.image_shape == (4, 14, 14)
    assert model.generate(2, steps=1).shape == (2, 1, 28, 28)  # samples decoded back to the images' shape
    rows = [json.loads(line) for line in (latent_run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)


def test_resume_on_memory_mapped_latents_equals_uninterrupted_device_run(tmp_path, extracted, monkeypatch):
    """The reference trains with the latents on the device; the other streams them from the shards, is stopped
    after its first checkpoint and resumed: the exported weights are the same, bit for bit."""
    common = ("train.steps=8", "train.ckpt_every=4")
    full, part = tmp_path / "full", tmp_path / "part"
    train_mod.main(latent_train_args(full, extracted, *common, "latents.resident=device"))
    real = MmapLatentStream.batch

    def dies_at_step_6(self, step):
        if step == 6:
            raise KeyboardInterrupt("killed")
        return real(self, step)

    with monkeypatch.context() as mp:
        mp.setattr(MmapLatentStream, "batch", dies_at_step_6)
        with pytest.raises(KeyboardInterrupt):
            train_mod.main(latent_train_args(part, extracted, *common, "latents.resident=stream"))
    assert not (part / "model.safetensors").exists()
    train_mod.main(["--resume", *latent_train_args(part, extracted, *common, "latents.resident=stream")])
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_latents_of_another_scaling(tmp_path, latent_run, extracted, vae_dir, images_npz, capsys):
    other = tmp_path / "lat"
    latents_mod.main(extract_args(vae_dir, other, images_npz, "--flip", "--scaling-factor", "0.25"))
    run = tmp_path / "run"
    shutil.copytree(latent_run, run)
    (run / "model.safetensors").unlink()
    with pytest.raises(SystemExit):
        train_mod.main(["--resume", *latent_train_args(run, other, "train.steps=6", "train.ckpt_every=3")])
    assert "latents.scaling_factor: checkpoint 0.5, now 0.25" in capsys.readouterr().err


# ------------------------------------------------------------------------ embeddings, probe and images
def test_embed_images_through_the_vae_equals_embed_of_stored_latents(latent_run, extracted, images_npz):
    model = fastsemdiff.load(latent_run, device="cpu")
    images = torch.from_numpy(np.load(images_npz)["x_test"][:, None])
    stored = torch.from_numpy(LatentShards(extracted, "test").all_latents())
    for t in (0.0, 0.5):
        z_img, z_lat = model.embed(images, t), model.embed(stored, t)
        assert z_img.shape == (N_TEST, 16)
        scale = z_lat.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(z_img, z_lat, rtol=0, atol=5e-3 * scale)  # differ by the fp16 storage only
    # float images in [0, 1] are the same images
    torch.testing.assert_close(model.embed(images.float() / 255, 0.0), model.embed(images, 0.0))
    with pytest.raises(ValueError, match=r"latents \[B, 4, 14, 14\].*images \[B, 1, 28, 28\]"):
        model.embed(torch.zeros(2, 3, 28, 28))


def test_generate_and_reconstruct_decode_through_the_vae(latent_run, images_npz, vae_dir):
    model = fastsemdiff.load(latent_run, device="cpu")
    x = model.generate(3, steps=2)
    assert x.shape == (3, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and x.std() > 0
    images = torch.from_numpy(np.load(images_npz)["x_test"][:2, None])
    assert model.reconstruct(images, t=0.0, steps=2).shape == (2, 1, 28, 28)
    # as_images decodes stored latents with the VAE: the same as decoding by hand
    z = model.codec.encode(images, torch.device("cpu"))
    vae = load_vae(vae_dir)
    with torch.no_grad():
        ref = ((vae.decode(z / SCALE + SHIFT).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(model.as_images(z), ref)


def test_embed_cli_from_latents_and_from_images(latent_run, tmp_path):
    from fastsemdiff.embed import main as embed_main

    embed_main(["--run", str(latent_run), "--out", str(tmp_path / "a.npz"), "--ts", "0", "--device", "cpu"])
    embed_main(["--run", str(latent_run), "--out", str(tmp_path / "b.npz"), "--ts", "0", "--device", "cpu",
                "--images"])
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["z"].shape == b["z"].shape == (N_TEST, 16)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["z"], b["z"], rtol=0, atol=5e-3 * np.abs(a["z"]).max())


def test_probe_and_sample_on_a_latent_trained_model(latent_run, tmp_path):
    from PIL import Image

    from fastsemdiff.eval import main as eval_main
    from fastsemdiff.sample import grid_size
    from fastsemdiff.sample import main as sample_main

    eval_main(["probe", "--run", str(latent_run), "--ts", "0", "0.5", "--device", "cpu", "--out", str(tmp_path),
               "--recon-steps", "2"])
    result = json.loads((tmp_path / "probe.json").read_text())
    assert (result["n_train"], result["n_test"], result["raw_pixels"]["dim"]) == (N_TRAIN, N_TEST, 4 * 14 * 14)
    assert {"pixel_pca", "untrained_encoder", "ddae"} <= set(result["baselines"])
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    sample_main(["--run", str(latent_run), "--out", str(tmp_path), "--n", "4", "--steps", "2", "--device", "cpu"])
    with Image.open(tmp_path / "samples.png") as img:
        assert img.size == grid_size(4, 28, 28, 2) and img.mode == "L"  # pixels, decoded, not 4-channel latents


# ------------------------------------------------------------------------------------------ bad input
def test_vae_folder_missing_or_not_an_autoencoder(tmp_path, vae_dir):
    with pytest.raises(VAEError, match="does not exist.*save_pretrained"):
        load_vae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="no config.json"):
        load_vae(tmp_path / "empty")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(VAEError, match="holds a UNet2DModel, not an AutoencoderKL"):
        load_vae(unet)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(vae_dir / "config.json", noweights)
    with pytest.raises(VAEError, match="no weights"):
        load_vae(noweights)
    broken = tmp_path / "broken"
    shutil.copytree(vae_dir, broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(VAEError, match="damaged or incomplete"):
        load_vae(broken)


def test_missing_diffusers_names_the_install(vae_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(VAEError, match="pip install diffusers"):
        load_vae(vae_dir)


def test_extraction_into_a_folder_of_another_extraction(tmp_path, images_npz, extracted):
    other_vae = make_vae(tmp_path / "other-vae", seed=1)
    out = tmp_path / "lat"
    shutil.copytree(extracted, out)
    with pytest.raises(DatasetError, match="already holds latents of another extraction.*vae"):
        latents_mod.extract(extract_args(other_vae, out, images_npz, "--flip"))


def _train_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("override, fragment", [
    ("latents.scaling_factor=1.0", "scaled with scaling_factor=0.5, not latents.scaling_factor=1; set "
                                   "latents.scaling_factor=0.5"),
    ("latents.shift_factor=0", "shift_factor=0.1, not latents.shift_factor=0"),
    ("latents.channels=3", "are 4x14x14, but latents.channels=3 latents.size=0; set latents.channels=4 "
                           "latents.size=14"),
    ("latents.vae_hash=abc", "encoded with another VAE"),
    ("data.loader=torch", "latents are held on the device or memory-mapped"),
])
def test_latents_that_do_not_match_the_config(tmp_path, extracted, capsys, override, fragment):
    err = _train_error(capsys, latent_train_args(tmp_path / "run", extracted, "train.steps=2", override))
    assert fragment in err, err


def test_latents_of_another_vae(tmp_path, extracted, capsys):
    other = make_vae(tmp_path / "other-vae", seed=1)
    err = _train_error(capsys, latent_train_args(tmp_path / "run", extracted, "train.steps=2",
                                                 f"latents.vae={other}"))
    assert f"not latents.vae={other}" in err and "extract latents for it: python -m fastsemdiff.latents" in err


def test_flips_asked_for_without_flipped_copies(tmp_path, vae_dir, images_npz, capsys):
    out = tmp_path / "lat"
    latents_mod.main(extract_args(vae_dir, out, images_npz))
    err = _train_error(capsys, latent_train_args(tmp_path / "run", out, "train.steps=2"))
    assert "data.hflip=true needs flipped copies" in err and "--flip" in err
    train_mod.main(latent_train_args(tmp_path / "run", out, "train.steps=2", "data.hflip=false"))


def test_missing_unfinished_or_truncated_latents(tmp_path, extracted, capsys):
    err = _train_error(capsys, latent_train_args(tmp_path / "run", tmp_path / "nowhere", "train.steps=2"))
    assert "does not exist" in err and "python -m fastsemdiff.latents" in err
    lat = tmp_path / "lat"
    shutil.copytree(extracted, lat)
    victim = shard_file(lat, "train", 2, "flipped")
    victim.write_bytes(victim.read_bytes()[:-64])
    err = _train_error(capsys, latent_train_args(tmp_path / "run", lat, "train.steps=2"))
    assert "train-00002.flipped.npy is truncated" in err and "python -m fastsemdiff.latents --vae" in err
    victim.unlink()
    err = _train_error(capsys, latent_train_args(tmp_path / "run", lat, "train.steps=2"))
    assert "train-00002.flipped.npy is missing" in err
    m = json.loads((lat / "manifest.json").read_text())
    (lat / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    err = _train_error(capsys, latent_train_args(tmp_path / "run", lat, "train.steps=2"))
    assert "did not finish" in err and m["command"] in err


def test_model_without_resolved_latent_shape(extracted):
    from fastsemdiff.config import ConfigError
    from fastsemdiff.models import SemanticDiffusion

    with pytest.raises(ConfigError, match="resolve_latents_config"):
        SemanticDiffusion(load_config(None, latent_train_args(Path("x"), extracted)))


def test_gpu_imagenet_config_builds_dit_xl2_on_32x32x4_latents(tmp_path):
    """The GPU config with an ImageNet-shaped manifest (no shards needed to resolve it): DiT-XL/2 at 256 tokens."""
    from fastsemdiff.data.latent_store import FORMAT
    from fastsemdiff.models import SemanticDiffusion

    manifest = {"format": FORMAT, "complete": True, "flipped": True, "shard_size": 8192,
                "vae": {"path": "/data/sd-vae-ft-ema", "hash": "0" * 64, "class": "AutoencoderKL",
                        "scaling_factor": 0.18215, "shift_factor": 0.0},
                "latent": {"channels": 4, "size": 32, "dtype": "float16"},
                "image": {"channels": 3, "size": 256, "source": "folder", "path": "/data/imagenet"},
                "splits": {"train": {"count": 1281167}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(str(REPO / "configs" / "gpu-imagenet-latents-XL2.yaml"), [f"data.path={tmp_path}"])
    cfg = resolve_latents_config(cfg)
    assert (cfg.data.image_size, cfg.data.channels, cfg.latents.channels, cfg.latents.size) == (256, 3, 4, 32)
    assert cfg.model.resolved() == (1152, 28, 16) and cfg.encoder.depth == 14
    assert (32 // cfg.model.patch_size) ** 2 == 256
    cfg.model.depth, cfg.encoder.depth = 1, 1  # the input side of the model, without building 28 XL blocks
    with torch.device("meta"):
        model = SemanticDiffusion(cfg)
    assert model.image_shape == (4, 32, 32) and model.codec.image_shape == (3, 256, 256)
