"""Headless training on a real CHAOS volume: episodes, loss going down, resume, checkpoints.

DDP (two CPU processes) is in test_ddp.py. Sizes are small (96 px) so the file runs in
about a minute on 2 cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from FewShotSegLib.checkpoints import load_checkpoint, load_training_state
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.models import build_model
from FewShotSegLib.preprocessing import PreprocessConfig
from Training.episodes import (AugmentConfig, EpisodeDataset, EpisodeSampler, VolumeSlices, augment,
                               superpixels)
import Training.train as T
from Training.train import EpisodeLoss, build_sampler, load_config, main, train

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, chaos_dir, **overrides) -> Path:
    config = {
        "name": "test-model", "model": "alpnet",
        "model_config": {"backbone": "effnet-lite0", "pretrained": True},
        "data": {"images": [str(chaos_dir / "image_5.nii.gz")], "axis": "axial",
                 "preprocess": {"size": 96}, "cache_dir": str(tmp_path / "cache")},
        "steps": 4, "batch_size": 1, "checkpoint_every": 2, "seed": 3, "device": "cpu",
        "freeze_backbone_blocks": 3, "out": str(tmp_path / "run"),
        # one thread: OpenMP threads that spin-wait slow a shared 2-core machine down many
        # times over when anything else runs; the results are the same either way
        "num_threads": 1,
    }
    config.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def volume(chaos_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("sp")
    return VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=96), "axial", cache), cache


def test_superpixels_are_cached_and_reused(volume, chaos_dir):
    vol, cache = volume
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=96), "axial", cache)
    assert files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.regions, vol.regions)
    assert vol.regions.shape == tuple(vol.slices.shape)
    assert len(vol.valid) > 5                         # many slices offer a pseudo-organ
    # another size is another key: no stale pseudo-labels of the wrong grid
    other = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", cache)
    assert other.regions.shape[1:] == (64, 64) and len(list(cache.glob("*.npz"))) == 2


def test_corrupt_cache_is_recomputed(chaos_dir, tmp_path):
    first = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    cached.write_bytes(b"not an npz")
    again = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", tmp_path)
    np.testing.assert_array_equal(again.regions, first.regions)


def test_a_cached_volume_is_memory_mapped_and_the_scan_not_read(volume, chaos_dir, monkeypatch):
    """A thousand-scan collection starts in seconds and shares the page cache across ranks."""
    import pickle
    import FewShotSegLib.imageio as imageio
    vol, cache = volume

    def no_scan(*_args, **_kwargs):
        raise AssertionError("the scan was read although its cache entry is complete")

    monkeypatch.setattr(imageio, "read_image", no_scan)
    again = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=96), "axial", cache)
    assert isinstance(again.regions, np.memmap) and isinstance(again.slices, torch.Tensor)
    torch.testing.assert_close(again.slices, vol.slices, rtol=0, atol=0)
    assert [(i, ids.tolist()) for i, ids in again.valid] == [(i, ids.tolist()) for i, ids in vol.valid]
    sent = pickle.dumps(again)                        # what a spawned DataLoader worker receives
    assert len(sent) < vol.slices.numel()             # the cache's path, not the volume
    back = pickle.loads(sent)
    np.testing.assert_array_equal(back.regions, vol.regions)
    assert torch.equal(back.slices, vol.slices)


def test_superpixels_of_the_previous_cache_format_are_reused(chaos_dir, tmp_path):
    """Hours of superpixels of a large collection survive the new cache format."""
    fresh = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", None)
    marked = np.where(fresh.regions > 0, fresh.regions + 7, 0).astype(np.int16)   # not what would be computed
    key = fresh._cache_key.__func__(type("P", (), {"image_path": fresh.image_path, "label_path": None})(),
                                    PreprocessConfig(size=64), "axial", 2)
    np.savez_compressed(tmp_path / f"image_5_{key}.npz", regions=marked)
    vol = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", tmp_path,
                       progress=lambda done, total: pytest.fail("superpixels computed again"))
    np.testing.assert_array_equal(vol.regions, marked)


def test_labels_are_cached_apart_from_superpixels(chaos_dir, tmp_path):
    labelled = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", tmp_path,
                            label_path=chaos_dir / "label_5.nii.gz")
    plain = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert set(np.unique(labelled.regions)) <= {0, 1, 2, 3, 4}
    assert not np.array_equal(plain.regions, labelled.regions)
    again = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", tmp_path,
                         label_path=chaos_dir / "label_5.nii.gz")
    assert isinstance(again.regions, np.memmap)
    np.testing.assert_array_equal(again.regions, labelled.regions)


def test_superpixel_preparation_reports_every_slice_and_the_cache_none(chaos_dir, tmp_path):
    calls = []
    vol = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", tmp_path,
                       progress=lambda done, total: calls.append((done, total)))
    n = vol.slices.shape[0]
    assert calls == [(i, n) for i in range(1, n + 1)]
    calls.clear()
    VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=64), "axial", tmp_path,
                 progress=lambda done, total: calls.append((done, total)))
    assert calls == []                               # read from the cache: nothing to wait for


def test_superpixels_stay_inside_the_body(volume):
    vol, _ = volume
    mid = vol.slices.shape[0] // 2
    seg = superpixels(vol.slices[mid].numpy())
    assert seg[0, 0] == 0 and seg[-1, -1] == 0        # corners are air
    assert len(np.unique(seg)) >= 3                  # background + at least two regions (96 px grid)


def test_episodes_are_deterministic_and_non_empty(volume):
    vol, _ = volume
    sampler = EpisodeSampler([vol], AugmentConfig(), seed=1, adjacent_probability=0.5)
    a = sampler.episode(step=7)
    b = sampler.episode(step=7)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    s_img, s_mask, q_img, q_mask = a
    assert s_img.shape == q_img.shape == s_mask.shape == (96, 96)
    assert s_mask.sum() > 0 and q_mask.sum() > 0
    assert set(torch.unique(s_mask).tolist()) <= {0.0, 1.0}
    assert not torch.equal(sampler.episode(step=8)[0], s_img)
    # ranks draw different episodes; the DataLoader dataset is the sampler, step by step
    other_rank = EpisodeSampler([vol], AugmentConfig(), seed=1, rank=1, adjacent_probability=0.5)
    assert not torch.equal(other_rank.episode(step=7)[0], s_img)
    dataset = EpisodeDataset(sampler, start=5, steps=10, batch_size=2)
    assert len(dataset) == 5
    for x, y in zip(dataset[2], sampler.batch(7, 2)):
        assert x.shape[0] == 2 and torch.equal(x, y)


def test_label_episodes_keep_the_label(chaos_dir, tmp_path):
    vol = VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=96), "axial", None,
                       label_path=chaos_dir / "label_5.nii.gz")
    assert set(np.unique(vol.regions)) <= {0, 1, 2, 3, 4}
    identity = AugmentConfig(rotate_deg=0, shift_px=0, shear_deg=0, scale=(1, 1), elastic_alpha=0, gamma=(1, 1))
    sampler = EpisodeSampler([vol], identity, seed=0, adjacent_probability=1.0)
    for step in range(6):
        s_img, s_mask, q_img, q_mask = sampler.episode(step)
        assert s_mask.sum() >= 200 and q_mask.sum() >= 200
        s_idx = next(i for i, s in enumerate(vol.slices) if torch.allclose(s, s_img, atol=1e-4))
        values = np.unique(vol.regions[s_idx][s_mask.numpy() > 0.5])
        assert values.size == 1 and values[0] > 0    # exactly one organ
        q_idx = next(i for i, s in enumerate(vol.slices) if torch.allclose(s, q_img, atol=1e-4))
        assert abs(q_idx - s_idx) <= 1
        assert np.all(vol.regions[q_idx][q_mask.numpy() > 0.5] == values[0])  # same organ there


def test_augment_moves_image_and_mask_together():
    img = torch.zeros(64, 64)
    img[20:40, 20:40] = 1.0
    mask = (img > 0.5).float()
    g = torch.Generator().manual_seed(0)
    out_img, out_mask = augment(img, mask, AugmentConfig(gamma=(1.0, 1.0)), g)
    inside = out_img[out_mask > 0.5].mean()
    outside = out_img[out_mask < 0.5].mean()
    assert inside > 0.8 and outside < 0.2


def test_augment_is_deterministic_given_the_generator():
    img = torch.linspace(-1, 3, 64 * 64).reshape(64, 64)
    mask = torch.zeros(64, 64)
    mask[10:30, 25:50] = 1
    runs = [augment(img, mask, AugmentConfig(), torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    assert set(torch.unique(runs[0][1]).tolist()) <= {0.0, 1.0}   # masks stay binary (nearest)


def test_intensity_remap_changes_brightness_not_geometry_and_is_off_by_default():
    """The random curve (AugmentConfig.intensity_remap) keeps the image within its range and
    the mask untouched, can darken a bright organ below its surroundings (not monotonic), and
    draws nothing when off, so runs without it are as before."""
    from FewShotSegLib.augmentation import remap_intensities
    img = torch.zeros(64, 64)
    img[20:40, 20:40] = 1.0
    organ = img > 0.5
    darker = 0
    for seed in range(40):
        out = remap_intensities(img, torch.Generator().manual_seed(seed))
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
        assert torch.unique(out[organ]).numel() == 1     # one level in, one level out: a curve
        darker += bool(out[organ][0] < out[~organ][0])
    assert 0 < darker < 40                               # the organ got darker than its body in some
    mask = organ.float()
    plain = augment(img, mask, AugmentConfig(), torch.Generator().manual_seed(1))
    off = augment(img, mask, AugmentConfig(intensity_remap=0.0), torch.Generator().manual_seed(1))
    on = augment(img, mask, AugmentConfig(intensity_remap=1.0), torch.Generator().manual_seed(1))
    assert torch.equal(plain[0], off[0]) and torch.equal(on[1], plain[1]) and not torch.equal(on[0], plain[0])


@pytest.mark.parametrize("value", ["yes", 1.5, -0.1, True])
def test_a_bad_intensity_remap_is_one_clear_line_when_the_config_loads(tmp_path, chaos_dir, value):
    path = write_config(tmp_path, chaos_dir, steps=1, augment={"intensity_remap": value})
    with pytest.raises(FewShotSegError, match=r"invalid augment settings: intensity_remap must be a probability"):
        load_config(path, {})
    assert not (tmp_path / "run").exists()


def test_training_lowers_the_loss(tmp_path, chaos_dir):
    path = write_config(tmp_path, chaos_dir, steps=30, checkpoint_every=100, lr=0.01)
    config = load_config(path, {})
    ckpt = train(config, argv=["--config", str(path)])
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])

    # the robust check: the same 12 held-out episodes (another seed), before and after
    held_out = {**config, "seed": 777}
    sampler, _, _ = build_sampler(held_out, rank=0)
    batches = [sampler.batch(10_000 + i, 1) for i in range(12)]

    def mean_loss(model):
        loss = EpisodeLoss(model.train(), [0.05, 1.0], 1.0)
        with torch.no_grad():
            return float(np.mean([sum(float(t) for t in loss(*b)) for b in batches]))

    torch.manual_seed(config["seed"])
    before = mean_loss(build_model("alpnet", backbone="effnet-lite0", pretrained=True))
    loaded = load_checkpoint(ckpt)
    after = mean_loss(loaded.model)
    assert after < 0.85 * before, (before, after)

    prov = loaded.provenance
    assert prov["steps"] == 30 and loaded.preprocess.size == 96 and loaded.name == "alpnet"
    assert "image_5.nii.gz" in prov["data"][0] and len(next(iter(prov["data_sha256"].values()))) == 64
    for key in ("command", "code_version", "wall_seconds", "hardware", "torch", "date", "seed"):
        assert prov[key] not in (None, ""), key
    assert next(v for v in loaded.model.state_dict().values()).dtype == torch.float32
    raw = torch.load(ckpt, weights_only=True)
    assert any(v.dtype == torch.float16 for v in raw["state_dict"].values())  # shipped in half


def test_resume_continues_exactly(tmp_path, chaos_dir):
    """4 steps in one go == 2 steps, stop, --resume to 4 (with a DataLoader worker)."""
    def config_in(folder: str, steps: int) -> dict:
        (tmp_path / folder).mkdir(exist_ok=True)
        path = write_config(tmp_path / folder, chaos_dir, out=str(tmp_path / folder / "run"), steps=steps,
                            num_workers=1 if folder == "split" else 0,
                            data={"images": [str(chaos_dir / "image_5.nii.gz")], "preprocess": {"size": 96},
                                  "cache_dir": str(tmp_path / "cache"), "adjacent_probability": 0.5})
        return load_config(path, {})

    train(config_in("whole", 4))
    train(config_in("split", 2))
    assert load_training_state(tmp_path / "split" / "run" / "train_state.pt")["step"] == 2
    train(config_in("split", 4), resume=True)
    a = load_training_state(tmp_path / "whole" / "run" / "train_state.pt")
    b = load_training_state(tmp_path / "split" / "run" / "train_state.pt")
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    log = [json.loads(line) for line in (tmp_path / "split" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert any(r.get("event") == "resume" for r in log)


def test_cosine_schedule_anneals_over_the_run_and_resumes(tmp_path, chaos_dir, monkeypatch):
    """lr_schedule 'cosine': the rate falls from lr to 0 over `steps` (a short budget ends
    annealed); a run stopped half-way (as by SIGTERM) resumes on the same curve."""
    def config_in(folder: str) -> dict:
        (tmp_path / folder).mkdir()
        return load_config(write_config(tmp_path / folder, chaos_dir, out=str(tmp_path / folder / "run"),
                                        steps=4, lr=0.002, lr_schedule="cosine"), {})

    def rates(folder: str) -> list:
        log = (tmp_path / folder / "run" / "log.jsonl").read_text().splitlines()
        return [r["lr"] for r in map(json.loads, log) if "loss" in r]   # the rate after each step

    train(config_in("whole"))
    assert rates("whole") == pytest.approx([0.001 * (1 + np.cos(np.pi * s / 4)) for s in (1, 2, 3, 4)], abs=1e-12)

    class StopAfterTwoSteps(T._StopFlag):   # a stop request arriving during step 2
        reads = 0

        @property
        def requested(self):
            StopAfterTwoSteps.reads += 1
            return StopAfterTwoSteps.reads >= 2

        @requested.setter
        def requested(self, value):
            pass

    split = config_in("split")
    with monkeypatch.context() as patch:
        patch.setattr(T, "_StopFlag", StopAfterTwoSteps)
        with pytest.raises(KeyboardInterrupt):
            train(split)
    assert load_training_state(tmp_path / "split" / "run" / "train_state.pt")["step"] == 2
    train(split, resume=True)
    assert rates("split") == pytest.approx(rates("whole"), abs=1e-12)


def test_config_errors_name_the_problem(tmp_path, chaos_dir, capsys):
    bad_key = write_config(tmp_path, chaos_dir, stpes=3)
    with pytest.raises(FewShotSegError, match="stpes"):
        load_config(bad_key, {})
    missing = write_config(tmp_path, chaos_dir, data={"images": ["nowhere/image_*.nii.gz"]})
    assert main(["--config", str(missing), "--steps", "1"]) == 2
    assert "nowhere/image_*.nii.gz" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "absent.json")]) == 2
    with pytest.raises(FewShotSegError, match="lr_schedule must be"):
        load_config(write_config(tmp_path, chaos_dir, lr_schedule="linear"), {})


def test_shipped_configs_are_valid():
    for name in ("ssl_default.json", "smoke.json", "ssl_gpu.json"):
        config = load_config(ROOT / "Training" / "configs" / name, {})
        model = build_model(config["model"], **{**config["model_config"], "pretrained": False})
        assert model.name == config["model"]
        assert PreprocessConfig.from_dict(config["data"]["preprocess"]).size > 0


def test_publish_ships_the_checkpoint_with_its_card_and_catalog_checksum(tmp_path, monkeypatch):
    from FewShotSegLib.checkpoints import save_checkpoint
    from FewShotSegLib.model_store import sha256_of
    from Training import publish

    root = tmp_path / "repo"
    (root / "FewShotSeg" / "Resources").mkdir(parents=True)
    (root / "Resources" / "Models").mkdir(parents=True)
    (root / "FewShotSeg" / "Resources" / "Models.json").write_text(json.dumps({"models": []}))
    monkeypatch.setattr(publish, "ROOT", root)
    source = tmp_path / "run" / "mymodel.pt"
    source.parent.mkdir()
    save_checkpoint(source, build_model("alpnet", pretrained=False), preprocess=PreprocessConfig(size=64),
                    provenance={"steps": 5, "data": ["a.nii.gz"], "wall_seconds": 36.0})
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({
        "benchmark": "product", "mode": "chained",
        "options": {"registration_weight": 0.5, "min_intensity_agreement": 0.5},
        "chaos_t2": {"cases": 20, "mean_dice": 0.75, "dice_per_organ": {"liver": 0.7, "spleen": 0.8}},
        "totalseg_ct_agreement": {"mean_dice": 0.6}}))
    publish.main([str(source), "--benchmark", str(bench), "--note", "A note."])
    shipped = root / "Resources" / "Models" / "mymodel.pt"
    card = shipped.with_suffix(".md").read_text()
    assert "mean Dice 0.750" in card and "registration (weight 0.5)" in card and "A note." in card
    assert sha256_of(shipped) in card
    catalog = json.loads((root / "FewShotSeg" / "Resources" / "Models.json").read_text())
    assert catalog["models"][0]["sha256"] == sha256_of(shipped)
    assert "0.750" in load_checkpoint(shipped).card["measured"]


def test_fewshotseg_train_command_passes_its_options_to_train_py(tmp_path, chaos_dir):
    from FewShotSegLib.cli import main as cli_main
    path = write_config(tmp_path, chaos_dir, steps=2, checkpoint_every=1)
    assert cli_main(["train", "--config", str(path)]) == 0
    assert load_checkpoint(tmp_path / "run" / "test-model.pt").provenance["steps"] == 2
    assert cli_main(["train", "--config", str(path), "--resume", "--steps", "3"]) == 0
    assert load_checkpoint(tmp_path / "run" / "test-model.pt").provenance["steps"] == 3


def test_prepare_only_fills_the_cache_with_worker_processes(tmp_path, chaos_dir, capsys):
    """A large collection is prepared once, several volumes at a time, before any training;
    the training that follows reads no scan."""
    images = [str(chaos_dir / f"image_{case}.nii.gz") for case in (5, 8)]
    config = write_config(tmp_path, chaos_dir, data={"images": images, "axis": "axial", "preprocess": {"size": 64},
                                                    "cache_dir": str(tmp_path / "cache")})
    assert main(["--config", str(config), "--prepare-only", "--prepare-workers", "2"]) == 0
    assert "prepared 2 files: 2 volumes" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    assert not (tmp_path / "run").exists()                     # nothing trained
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert main(["--config", str(config), "--prepare-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stamps


def test_prepare_only_without_a_cache_folder_is_one_line(tmp_path, chaos_dir, capsys):
    config = write_config(tmp_path, chaos_dir, data={"images": [str(chaos_dir / "image_5.nii.gz")], "axis": "axial",
                                                    "cache_dir": None})
    assert main(["--config", str(config), "--prepare-only"]) == 2
    assert "needs data.cache_dir" in capsys.readouterr().err
