"""Refiners: HLF-Net and MedSegDiff-V2 building blocks, the refine() sampling API, the
refiner trainer and the `fewshotseg refine` command. Tiny models keep it fast on a CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FewShotSegLib.checkpoints import load_checkpoint, save_checkpoint
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.preprocessing import PreprocessConfig
from FewShotSegLib.refinement import available_refiners, build_refiner
from FewShotSegLib.refinement.hlfnet import HFE, LFE
from FewShotSegLib.refinement.medsegdiff import USA, NBPFilter, timestep_embedding
from FewShotSegLib.refinement.perturb import degrade_mask
from FewShotSegLib.refinement.sampling import RefineOptions, refine

try:  # the shared fixture (Testing/conftest.py); a local fallback keeps this file usable alone
    from conftest import shared_data  # noqa: F401
except ImportError:  # pragma: no cover
    @pytest.fixture(scope="session")
    def shared_data() -> Path:
        path = Path(__file__).resolve().parents[2] / "shared" / "data"
        if not path.is_dir():
            pytest.skip("../shared/data not found: real-scan tests need the shared data folder")
        return path

TINY = {"crop_size": 32, "channels": [8, 16], "cond_channels": [8, 16, 32], "timesteps": 100, "heads": 2}
PRE = PreprocessConfig(size=64)


@pytest.fixture(autouse=True)
def _threads():
    """One thread: these tiny models gain nothing from two, and on a shared CPU a second
    thread that waits for a core makes every convolution many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def synthetic_volume(slices=10, size=64, seed=0):
    """A bright ellipsoid in a noisy background, its true mask, and a damaged copy."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:slices, :size, :size]
    truth = ((zz - slices / 2) / (slices / 3)) ** 2 + ((yy - 30) / 14) ** 2 + ((xx - 34) / 11) ** 2 <= 1
    array = (50 + 150 * truth + rng.normal(0, 10, truth.shape)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 3.0))
    image.SetOrigin((-10.0, 5.0, 2.0))
    coarse = np.roll(truth, 2, axis=2)
    return image, truth, coarse


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_refiner("medsegdiff_v2", **TINY)
    path = tmp_path_factory.mktemp("models") / "tiny-refiner.pt"
    save_checkpoint(path, model, kind="refiner", preprocess=PRE, provenance={"test": True},
                    extra={"crop_size": TINY["crop_size"]})
    return path


# ----------------------------------------------------------------------------- models
def test_registry_and_config_round_trip():
    assert {"hlfnet", "medsegdiff_v2"} <= set(available_refiners())
    for name, cfg in (("hlfnet", {"channels": [8, 16, 32]}), ("medsegdiff_v2", TINY)):
        model = build_refiner(name, pretrained=False, **cfg)
        assert model.name == name
        again = build_refiner(name, **json.loads(json.dumps(model.config)), pretrained=False)
        assert again.config == model.config
    with pytest.raises(FewShotSegError, match="unknown refiner"):
        build_refiner("nope")


def test_hlfnet_shapes_and_backward():
    model = build_refiner("hlfnet")                            # the paper's 16..256 U-Net
    assert model.config["channels"] == [16, 32, 64, 128, 256]
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 1, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert [f.shape[1] for f in model.features(x.detach())] == [256, 128, 64, 32, 16]


def test_lfe_weight_map_and_hfe_residual_weights():
    torch.manual_seed(0)
    lfe = LFE(4, 8)
    x = torch.randn(1, 4, 20, 20)
    s = lfe.semantic_map(x).detach()
    assert s.shape == (1, 1, 20, 20) and float(s.min()) >= 0 and float(s.max()) <= 1
    torch.testing.assert_close(lfe(x), (1 + s) * lfe.trunk(x))
    hfe = HFE(8, 16, 8)
    y = hfe(torch.randn(1, 8, 20, 20), torch.randn(1, 16, 10, 10))
    assert y.shape == (1, 8, 20, 20)


def test_medsegdiff_shapes_and_backward():
    model = build_refiner("medsegdiff_v2", **TINY)
    image, anchor = torch.randn(3, 1, 32, 32), (torch.rand(3, 1, 32, 32) > 0.5).float()
    x_t, t = torch.randn(3, 1, 32, 32), torch.tensor([1, 50, 99])
    logits, anchor_logits = model(x_t, t, image, anchor)
    assert logits.shape == anchor_logits.shape == (3, 1, 32, 32)
    (logits.mean() + anchor_logits.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    probs = model.eval().sample(image, anchor, samples=4, steps=3, start_t=0.5)
    assert probs.shape == (3, 4, 32, 32) and float(probs.min()) >= 0 and float(probs.max()) <= 1


def test_usa_anchor_is_at_least_the_feature_and_gate_is_residual():
    torch.manual_seed(0)
    usa = USA(4)
    f_c, f_d = torch.randn(2, 4, 16, 16), torch.randn(2, 6, 16, 16)
    assert bool((usa.anchor(f_c) >= f_c).all())
    k = usa.gauss.kernel()
    torch.testing.assert_close(k.sum((1, 2, 3)), torch.ones(4))
    with torch.no_grad():
        usa.attn.weight.zero_()
        usa.attn.bias.fill_(0.3)
    torch.testing.assert_close(usa(f_d, f_c), (1 + torch.sigmoid(torch.tensor(0.3))) * f_d)


def test_nbp_filter_identity_at_init_and_step_dependent_band_pass():
    torch.manual_seed(0)
    nbp = NBPFilter(channels=2, temb_dim=8, bands=8)
    x = torch.randn(2, 2, 12, 12)
    temb = timestep_embedding(torch.tensor([10, 900]), 8)
    torch.testing.assert_close(nbp(x, temb), x, atol=1e-5, rtol=1e-5)   # zero-initialised: identity
    with torch.no_grad():                  # a low-pass: boost the low bands, drop the high ones
        nbp.gain.bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0, -10.0, -10.0, -10.0, -10.0]).repeat(2))
    flat = torch.ones(1, 2, 12, 12)
    checker = (torch.arange(12)[:, None] + torch.arange(12)[None]) % 2 * 2.0 - 1   # Nyquist corner
    out_flat, out_checker = nbp(flat, temb[:1]), nbp(checker.expand(1, 2, 12, 12), temb[:1])
    torch.testing.assert_close(out_flat, 2 * flat, atol=1e-2, rtol=1e-2)       # gain -> 2 (max)
    assert float(out_checker.detach().abs().max()) < 1e-3                       # gain -> 0
    with torch.no_grad():                                   # the spectrum depends on the step
        nbp.gain.weight.normal_()
    spectra = nbp.spectrum(temb, 12, 12).detach()
    assert float((spectra[0] - spectra[1]).abs().max()) > 1e-2


# ----------------------------------------------------------------------------- sampling
def test_refine_is_deterministic_with_a_seed(refiner_file):
    image, truth, coarse = synthetic_volume()
    refiner = load_checkpoint(refiner_file, expect_kind="refiner")
    a = refine(image, coarse, refiner, RefineOptions(samples=3, steps=2, seed=7))
    b = refine(image, coarse, refiner, RefineOptions(samples=3, steps=2, seed=7))
    c = refine(image, coarse, refiner, RefineOptions(samples=3, steps=2, seed=8))
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.uncertainty, b.uncertainty)
    assert not np.array_equal(a.uncertainty, c.uncertainty)
    shape = sitk.GetArrayViewFromImage(image).shape
    assert a.mask.shape == a.uncertainty.shape == a.probability.shape == shape
    assert a.mask.dtype == np.uint8 and a.uncertainty.dtype == np.float32
    # the slices with the coarse mask plus one neighbour each side, nothing else
    present = np.flatnonzero(coarse.any((1, 2)))
    assert a.slices_done == len(present) + 2
    far = [z for z in range(shape[0]) if z < present[0] - 1 or z > present[-1] + 1]
    assert far and not a.uncertainty[far].any() and not a.mask[far].any()
    # the painted slice comes back exactly as painted, with zero uncertainty
    painted = np.zeros_like(truth)
    z = int(np.argmax(truth.sum((1, 2))))
    painted[z] = truth[z]
    k = refine(image, coarse, refiner, RefineOptions(samples=2, steps=1), keep=painted)
    np.testing.assert_array_equal(k.mask[z], truth[z])
    assert not k.uncertainty[z].any()


class _AgreeLeftModel(torch.nn.Module):
    """A stand-in refiner: all K samples agree on the left half of the crop (p = 1), and
    disagree on the right half (p alternates 0 / 1 between samples)."""

    crop_size = 32

    def sample(self, image, anchor, samples, steps, start_t, generator=None, eta=0.0):
        b, _, s, _ = image.shape
        probs = torch.ones(b, samples, s, s)
        probs[:, 1::2, :, s // 2:] = 0.0
        return probs


def test_uncertainty_is_zero_where_samples_agree_and_has_the_image_shape():
    image, truth, coarse = synthetic_volume()
    from FewShotSegLib.checkpoints import LoadedCheckpoint
    fake = LoadedCheckpoint(model=_AgreeLeftModel(), name="fake", kind="refiner", config={},
                            preprocess=PreprocessConfig(size=64), provenance={}, card={}, path=Path("fake"))
    result = refine(image, coarse, fake, RefineOptions(samples=4, steps=1, margin_mm=0))
    assert result.uncertainty.shape == sitk.GetArrayViewFromImage(image).shape
    z = int(np.argmax(coarse.sum((1, 2))))
    cols = np.flatnonzero(coarse[z].any(0))
    rows = np.flatnonzero(coarse[z].any(1))
    centre_r = (rows[0] + rows[-1]) // 2
    left = result.uncertainty[z, centre_r, cols[0] + 1: (cols[0] + cols[-1]) // 2 - 2]
    right = result.uncertainty[z, centre_r, (cols[0] + cols[-1]) // 2 + 3: cols[-1] - 1]
    assert left.max() < 1e-3                       # K samples agree: variance ~ 0
    assert right.min() > 0.2                       # 0/1 disagreement: variance 0.25


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_clear_errors(refiner_file, tmp_path):
    image, truth, coarse = synthetic_volume()
    refiner = load_checkpoint(refiner_file, expect_kind="refiner")
    with pytest.raises(FewShotSegError, match="empty"):
        refine(image, np.zeros_like(coarse), refiner)
    with pytest.raises(FewShotSegError, match="samples"):
        refine(image, coarse, refiner, RefineOptions(samples=0))
    with pytest.raises(FewShotSegError, match="steps"):
        refine(image, coarse, refiner, RefineOptions(steps=0))
    with pytest.raises(FewShotSegError, match="shape"):
        refine(image, coarse[:-1], refiner)
    with pytest.raises(FewShotSegError, match="start_t"):
        refine(image, coarse, refiner, RefineOptions(start_t=0))
    from FewShotSegLib.refinement import RefineCancelled
    with pytest.raises(RefineCancelled):
        refine(image, coarse, refiner, cancel=lambda: True)
    wrong = tmp_path / "fewshot.pt"
    save_checkpoint(wrong, build_refiner("hlfnet", channels=[8, 16]), kind="fewshot", preprocess=PRE,
                    provenance={})
    with pytest.raises(FewShotSegError, match="refiner is needed"):
        load_checkpoint(wrong, expect_kind="refiner")


def test_degradations_damage_but_keep_a_mask():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    mask = (yy - 48) ** 2 + (xx - 40) ** 2 <= 20 ** 2
    dices = []
    for _ in range(30):
        out = degrade_mask(mask, rng, neighbour=np.roll(mask, 3, 0))
        assert out.any() and out.shape == mask.shape
        dices.append(2 * (out & mask).sum() / (out.sum() + mask.sum()))
    assert 0.6 < np.mean(dices) < 0.99


# ----------------------------------------------------------------------------- training
def test_a_few_training_steps_lower_the_loss_on_a_real_chaos_label(shared_data):
    from FewShotSegLib.imageio import read_image
    from FewShotSegLib.preprocessing import prepare_volume
    from FewShotSegLib.refinement.crops import crop_resize
    from FewShotSegLib.refinement.perturb import square_box
    from Training.train_refiner import training_loss

    folder = shared_data / "chaos_t2"
    image = read_image(folder / "image_1.nii.gz")
    label = sitk.GetArrayFromImage(read_image(folder / "label_1.nii.gz", label=True))
    prepared = prepare_volume(image, "axial", PreprocessConfig(size=128))
    rng = np.random.default_rng(0)
    crops = []
    for organ in (1, 2, 4):
        z = int(np.argmax((label == organ).sum((1, 2))))
        clean = (prepared.mask_to_model(label == organ, indices=[z])[0] > 0.5).numpy()
        for _ in range(2):
            coarse = degrade_mask(clean, rng)
            box = square_box(coarse, 6)
            crops.append((crop_resize(prepared.model_slices([z])[0], box, 32, pad="border")[None],
                          (crop_resize(torch.from_numpy(clean).float(), box, 32) > 0.5).float()[None],
                          (crop_resize(torch.from_numpy(coarse).float(), box, 32) > 0.5).float()[None]))
    batch = [torch.stack(t) for t in zip(*crops)]
    torch.manual_seed(0)
    model = build_refiner("medsegdiff_v2", **TINY)
    cfg = {"t_max": 0.7, "anchor_weight": 0.5}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_now():
        with torch.no_grad():
            return float(training_loss(model, *batch, cfg, torch.Generator().manual_seed(1)))

    before = loss_now()
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = training_loss(model, *batch, cfg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now() < 0.8 * before


def test_trainer_main_writes_a_refiner_checkpoint_and_resumes(shared_data, tmp_path):
    from Training.train_refiner import main
    cfg = {"model": "medsegdiff_v2", "model_config": TINY, "preprocess": {"size": 64},
           "data": {"root": str(shared_data), "chaos_cases": ["1"], "chaos_holdout": ["2"], "totalseg": []},
           "steps": 2, "batch_size": 2, "threads": 1, "train_crops": [32], "train_crop_p": [1],
           "log_every": 1, "save_every": 1, "eval_every": 2, "eval_samples": 4, "out": str(tmp_path / "run")}
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg))
    assert main(["--config", str(config)]) == 0
    ck = load_checkpoint(tmp_path / "run" / "last.pt", expect_kind="refiner")
    assert ck.name == "medsegdiff_v2" and ck.provenance["steps"] == 2 and ck.provenance["holdout_cases"] == ["2"]
    cfg["steps"] = 3
    config.write_text(json.dumps(cfg))
    from Training.train import main as train_main   # the one entry point hands refiners on
    assert train_main(["--config", str(config), "--resume"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt", expect_kind="refiner").provenance["steps"] == 3


# ----------------------------------------------------------------------------- command line
def test_cli_refine_resamples_the_mask_and_refuses_bad_paths(refiner_file, tmp_path, capsys):
    from FewShotSegLib.refinement.cli import main
    image, truth, coarse = synthetic_volume()
    img_path, mask_path = tmp_path / "image.nii.gz", tmp_path / "coarse.nrrd"
    sitk.WriteImage(image, str(img_path))
    mask_img = sitk.GetImageFromArray(coarse.astype(np.uint8))
    mask_img.CopyInformation(image)
    # the coarse mask on another grid (half the in-plane resolution): it must be resampled
    fine = sitk.Resample(mask_img, [32, 32, 10], sitk.Transform(), sitk.sitkNearestNeighbor, image.GetOrigin(),
                         (3.0, 3.0, 3.0), image.GetDirection(), 0, sitk.sitkUInt8)
    sitk.WriteImage(fine, str(mask_path))
    out, unc = tmp_path / "refined.nii.gz", tmp_path / "unc.nii.gz"
    args = [str(img_path), "--mask", str(mask_path), "--model", str(refiner_file), "--samples", "2",
            "--steps", "2", "-q"]
    assert main(["refine"] + args + ["-o", str(out), "--uncertainty", str(unc)]) == 0
    refined, u = sitk.ReadImage(str(out)), sitk.ReadImage(str(unc))
    assert refined.GetSize() == u.GetSize() == image.GetSize()
    assert np.allclose(refined.GetOrigin(), image.GetOrigin())
    assert main(["refine"] + args + ["-o", str(mask_path)]) == 2
    assert "also an input" in capsys.readouterr().err
    assert main(["refine"] + args + ["-o", str(tmp_path / "x.nii.gz"), "--samples", "0"]) == 2
    wrong = tmp_path / "fewshot.pt"
    save_checkpoint(wrong, build_refiner("hlfnet", channels=[8, 16]), kind="fewshot", preprocess=PRE,
                    provenance={})
    assert main(["refine", str(img_path), "--mask", str(mask_path), "--model", str(wrong),
                 "-o", str(tmp_path / "y.nii.gz"), "-q"]) == 2
    assert "refiner is needed" in capsys.readouterr().err
    assert not (tmp_path / "y.nii.gz").exists()


def test_refiner_data_learns_from_the_few_shot_models_own_errors(shared_data, tmp_path):
    """With fewshot_fraction 1 every coarse mask is the few-shot propagation of that slice."""
    from FewShotSegLib.checkpoints import save_checkpoint
    from FewShotSegLib.models import build_model
    from Training.train_refiner import DEFAULTS, RefinerData

    torch.manual_seed(0)
    fewshot = tmp_path / "fewshot.pt"
    save_checkpoint(fewshot, build_model("alpnet", pretrained=False), preprocess=PreprocessConfig(size=64),
                    provenance={})
    cfg = json.loads(json.dumps(DEFAULTS))
    cfg["data"].update({"root": str(shared_data), "chaos_cases": ["15"], "chaos_holdout": ["2"], "totalseg": [],
                        "fewshot_model": str(fewshot), "fewshot_fraction": 1.0})
    data = RefinerData(cfg, PreprocessConfig(size=64), log=lambda *a: None)
    assert data.structures and all(s.propagated is not None for s in data.structures)
    assert all(s.propagated.shape == s.masks.shape for s in data.structures)
    rng = np.random.default_rng(0)
    for _ in range(5):
        vol, i, clean, neighbour, coarse = data._pick(rng)
        owners = [s for s in data.structures if s.volume == vol and s.first <= i < s.first + len(s.masks)]
        assert any(np.array_equal(coarse, s.propagated[i - s.first].numpy())
                   and np.array_equal(clean, s.masks[i - s.first].numpy()) for s in owners)
        assert coarse.any() and not np.array_equal(coarse, clean)   # a real mistake, never the label
    image, clean_c, coarse_c = data.sample(rng, 32)
    assert image.shape == clean_c.shape == coarse_c.shape == (1, 32, 32)
    cfg["data"]["fewshot_fraction"] = 0.0                            # off: no propagation at all
    assert all(s.propagated is None for s in RefinerData(cfg, PreprocessConfig(size=64),
                                                         log=lambda *a: None).structures)
