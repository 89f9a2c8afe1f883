"""The engine end to end on real scans: checkpoints, propagation, post-processing, metrics.

Small untrained models (64 px grid) keep this fast; accuracy with the shipped model is
checked in test_cli.py.
"""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FewShotSegLib.checkpoints import (FORMAT_VERSION, load_checkpoint, read_checkpoint_dict,
                                       save_checkpoint)
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.evaluation import largest_slice_support
from FewShotSegLib.imageio import read_image
from FewShotSegLib.metrics import dice, hd95, iou
from FewShotSegLib.models import build_model
from FewShotSegLib.postprocessing import clean_mask
from FewShotSegLib.preprocessing import PreprocessConfig
from FewShotSegLib.propagation import PropagationCancelled, PropagationOptions, propagate

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("alpnet", pretrained=True)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, preprocess=PreprocessConfig(size=64), provenance={"test": True},
                    card={"description": "untrained test model"})
    return path


@pytest.fixture(scope="module")
def chaos_case(chaos_dir):
    image = read_image(chaos_dir / "image_2.nii.gz")
    label = sitk.GetArrayFromImage(read_image(chaos_dir / "label_2.nii.gz", label=True))
    return image, label


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_keeps_weights_and_metadata(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    assert loaded.name == "alpnet" and loaded.kind == "fewshot"
    assert loaded.preprocess.size == 64
    assert loaded.provenance == {"test": True}
    assert not loaded.model.training
    payload = read_checkpoint_dict(tiny_checkpoint)
    assert payload["format_version"] == FORMAT_VERSION
    ref = {k: v.float() for k, v in payload["state_dict"].items() if v.is_floating_point()}
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())


def test_truncated_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(FewShotSegError, match="truncated.pt"):
        load_checkpoint(bad)


def test_newer_format_and_other_kind_are_refused(tiny_checkpoint, tmp_path):
    payload = read_checkpoint_dict(tiny_checkpoint)
    payload["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(FewShotSegError, match="newer"):
        load_checkpoint(newer)
    payload["format_version"] = FORMAT_VERSION
    payload["kind"] = "refiner"
    refiner = tmp_path / "refiner.pt"
    torch.save(payload, refiner)
    with pytest.raises(FewShotSegError, match="refiner"):
        load_checkpoint(refiner, expect_kind="fewshot")


def test_checkpoint_of_another_architecture_is_refused(tiny_checkpoint, tmp_path):
    payload = read_checkpoint_dict(tiny_checkpoint)
    payload["model_name"] = "crtpnet"  # weights of alpnet under crtpnet's name
    wrong = tmp_path / "wrong.pt"
    torch.save(payload, wrong)
    with pytest.raises(FewShotSegError, match="does not match"):
        load_checkpoint(wrong)


def test_pickled_code_is_not_loaded(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fewshotseg-checkpoint", "obj": zipfile.ZipFile}, evil)
    with pytest.raises(FewShotSegError, match="evil.pt"):
        load_checkpoint(evil)


# ---------------------------------------------------------------- propagation
@pytest.mark.parametrize("mode", ["direct", "chained"])
def test_propagation_fills_slices_and_keeps_painted_slice(tiny_checkpoint, chaos_case, mode):
    image, label = chaos_case
    truth = label == 1
    support, index = largest_slice_support(truth, 0)
    messages = []
    result = propagate(image, support, load_checkpoint(tiny_checkpoint), PropagationOptions(mode=mode),
                       progress=lambda f, m: messages.append(f))
    assert result.mask.shape == label.shape and result.mask.dtype == np.uint8
    np.testing.assert_array_equal(result.mask[index], support[index])
    filled = np.flatnonzero(result.mask.reshape(len(result.mask), -1).any(1))
    assert len(filled) > 1                      # it went beyond the painted slice
    assert dice(result.mask, truth) > 0.3       # and found the liver (untrained, small grid)
    assert messages[0] == 0.0 and messages[-1] == 1.0
    assert result.network_seconds > 0


def test_intensity_band_and_agreement_known_values():
    from FewShotSegLib.extent import intensity_agreement, intensity_band
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    painted = np.zeros((10, 10), bool)
    painted[:5] = True                                   # values 0..49
    low, high = intensity_band(image, painted)
    assert low == pytest.approx(np.percentile(np.arange(50), 5))
    assert high == pytest.approx(np.percentile(np.arange(50), 95))
    assert intensity_agreement(image, painted, (low, high)) == pytest.approx(44 / 50)  # 3..46 inside
    assert intensity_agreement(image, ~painted, (low, high)) == 0.0   # all 50..99: outside the band
    assert intensity_agreement(image, np.zeros((10, 10), bool), (low, high)) == 0.0


@pytest.mark.parametrize("mode", ["chained", "direct"])
def test_intensity_stop_rule_only_shortens_the_walks(tiny_checkpoint, chaos_case, mode):
    """The rule ends a walk earlier or not at all: with it, the filled slices are a subset."""
    image, label = chaos_case
    support, _ = largest_slice_support(label == 4, 0)
    ckpt = load_checkpoint(tiny_checkpoint)
    free = propagate(image, support, ckpt, PropagationOptions(mode=mode, min_intensity_agreement=0.0))
    strict = propagate(image, support, ckpt, PropagationOptions(mode=mode, min_intensity_agreement=0.9))
    rows = lambda m: set(np.flatnonzero(m.reshape(len(m), -1).any(1)).tolist())
    assert rows(strict.mask) <= rows(free.mask)
    assert strict.slices_done <= free.slices_done
    assert strict.stopped_at                             # a 90 % agreement demand ends walks
    with pytest.raises(FewShotSegError, match="min_intensity_agreement"):
        PropagationOptions(min_intensity_agreement=1.5).validate()


def test_intensity_gate_only_removes_off_intensity_voxels_and_keeps_the_painting(tiny_checkpoint, chaos_case):
    """Option intensity_gate (on by default): the gated mask (before clean-up) is the
    ungated one less voxels whose intensity is far from the organ's; the painted slice
    stays exactly as painted."""
    image, label = chaos_case
    support, z = largest_slice_support(label == 1, 0)     # the liver: the untrained walk goes on
    ckpt = load_checkpoint(tiny_checkpoint)
    options = dict(mode="direct", registration_weight=0, postprocess=False)
    plain = propagate(image, support, ckpt, PropagationOptions(**options, intensity_gate=False)).mask.astype(bool)
    gated = propagate(image, support, ckpt, PropagationOptions(**options, intensity_gate=True)).mask.astype(bool)
    assert not (gated & ~plain).any() and (gated[z] == support[z]).all()
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    removed, painted = plain & ~gated, support.astype(bool)
    assert removed.any()                      # a barely trained model spills onto other tissue
    centre = np.median(array[painted])
    assert np.median(np.abs(array[removed] - centre)) > 3 * np.median(np.abs(array[painted] - centre))
    with pytest.raises(FewShotSegError, match="intensity_gate must be true or false"):
        PropagationOptions(intensity_gate="yes").validate()


@pytest.mark.parametrize("axis", ["axial", "coronal"])
def test_post_processing_inside_the_result_box_equals_the_whole_volume_pass(tiny_checkpoint, chaos_case, axis):
    """The threshold, gate and clean-up run inside the box of nonzero probability and
    painting (for speed on a CT); over the whole volume they give the same mask."""
    from FewShotSegLib.imageio import array_axis_for
    from FewShotSegLib.postprocessing import intensity_gated

    image, label = chaos_case
    axis_index = array_axis_for(image, axis)
    support, _ = largest_slice_support(label == 1, axis_index)
    ckpt = load_checkpoint(tiny_checkpoint)
    result = propagate(image, support, ckpt, PropagationOptions(axis=axis, mode="direct"))
    probs = result.probability                          # painted slices carry the painting
    whole = intensity_gated(probs >= 0.5, sitk.GetArrayFromImage(image), probs)
    whole = clean_mask(whole, support.astype(bool), axis_index)
    assert whole.any() and np.array_equal(result.mask.astype(bool), whole)


def test_registration_mode_needs_no_model(chaos_case):
    image, label = chaos_case
    truth = label == 4
    support, _ = largest_slice_support(truth, 0)
    result = propagate(image, support, None, PropagationOptions(mode="registration"))
    assert dice(result.mask, truth) > 0.6


def test_cancel_raises_and_returns_nothing(tiny_checkpoint, chaos_case):
    image, label = chaos_case
    support, _ = largest_slice_support(label == 1, 0)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(PropagationCancelled):
        propagate(image, support, load_checkpoint(tiny_checkpoint), PropagationOptions(), cancel=cancel)


def test_adapting_tunes_a_copy_on_the_painted_slice_reports_progress_and_cancels(tiny_checkpoint, chaos_case):
    """adapt_steps: the walk runs with a copy tuned on the painted slice (other
    probabilities than without), the loaded model is left as it was, progress stays in
    order, and Cancel during the tuning writes nothing."""
    image, label = chaos_case
    support, _ = largest_slice_support(label == 1, 0)
    ckpt = load_checkpoint(tiny_checkpoint)
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    plain = propagate(image, support, ckpt, PropagationOptions(mode="direct"))
    seen = []
    adapted = propagate(image, support, ckpt, PropagationOptions(mode="direct", adapt_steps=3),
                        progress=lambda f, m: seen.append((f, m)))
    assert all(torch.equal(before[k], v) for k, v in ckpt.model.state_dict().items())
    assert adapted.adapt_seconds > 0 and plain.adapt_seconds == 0
    assert not np.allclose(adapted.probability, plain.probability)
    assert any("adapting" in m for _, m in seen) and [f for f, _ in seen] == sorted(f for f, _ in seen)
    with pytest.raises(FewShotSegError, match="adapt_steps"):
        propagate(image, support, ckpt, PropagationOptions(adapt_steps=-1))
    calls = []

    def cancel_while_tuning():
        calls.append(1)
        return len(calls) > 3     # after the volume is prepared: inside the tuning steps

    with pytest.raises(PropagationCancelled):
        propagate(image, support, ckpt, PropagationOptions(adapt_steps=50), cancel=cancel_while_tuning)
    assert len(calls) < 10


def test_bad_options_and_supports(tiny_checkpoint, chaos_case):
    image, label = chaos_case
    ckpt = load_checkpoint(tiny_checkpoint)
    support, _ = largest_slice_support(label == 1, 0)
    with pytest.raises(FewShotSegError, match="empty"):
        propagate(image, np.zeros_like(support), ckpt)
    with pytest.raises(FewShotSegError, match="mode"):
        propagate(image, support, ckpt, PropagationOptions(mode="magic"))
    with pytest.raises(FewShotSegError, match="shape"):
        propagate(image, support[:-1], ckpt)
    with pytest.raises(FewShotSegError, match="axis"):
        propagate(image, support, ckpt, PropagationOptions(axis="oblique"))
    one_slice = sitk.Image([32, 32, 1], sitk.sitkFloat32)
    with pytest.raises(FewShotSegError, match="single slice"):
        propagate(one_slice, np.ones((1, 32, 32), bool), ckpt)


def test_coronal_axis_propagates_along_the_right_array_axis(tiny_checkpoint, chaos_case):
    image, label = chaos_case
    truth = label == 1
    from FewShotSegLib.imageio import array_axis_for
    axis = array_axis_for(image, "coronal")
    assert axis != 0
    support, index = largest_slice_support(truth, axis)
    result = propagate(image, support, load_checkpoint(tiny_checkpoint),
                       PropagationOptions(mode="direct", axis="coronal"))
    np.testing.assert_array_equal(np.take(result.mask, index, axis=axis), np.take(support, index, axis=axis))
    assert dice(result.mask, truth) > 0.2


# ---------------------------------------------------------------- post-processing, metrics
def test_clean_mask_drops_disconnected_blobs_and_fills_holes():
    mask = np.zeros((5, 20, 20), bool)
    mask[1:4, 5:15, 5:15] = True
    mask[2, 9:11, 9:11] = False            # a hole
    mask[4, 0:2, 0:2] = True               # far blob, not touching
    painted = np.zeros_like(mask)
    painted[2, 6:14, 6:14] = True
    out = clean_mask(mask, painted, axis=0)
    assert not out[4].any()
    np.testing.assert_array_equal(out[2], painted[2])   # painted slice exactly as painted
    mask[1, 9:11, 9:11] = False                          # a hole in a filled slice
    assert clean_mask(mask, painted, axis=0)[1, 9:11, 9:11].all()


def _ring_volume():
    """A bright cavity inside a darker wall, the wall's radius changing along the slices."""
    z, y, x = np.mgrid[:24, :96, :96]
    r = np.hypot(y - 48, x - 48)
    outer = 24 + 3 * np.sin(z / 5.0)
    wall = (r <= outer) & (r > outer - 8) & (z >= 2) & (z <= 21)
    cavity = (r <= outer - 8) & (z >= 2) & (z <= 21)
    image = np.random.default_rng(0).normal(0.2, 0.08, r.shape).astype(np.float32)
    image[wall] += 0.6
    image[cavity] += 1.4
    return image, wall, cavity


def test_clean_mask_keeps_the_holes_of_a_painted_ring():
    _, wall, cavity = _ring_volume()
    painted = np.zeros_like(wall)
    painted[12] = wall[12]
    assert not clean_mask(wall, painted, axis=0)[cavity].any()
    brushed = wall | cavity                        # a filled painting with a one-pixel gap
    brushed[12, 48, 48] = False
    sloppy = np.zeros_like(wall)
    sloppy[12] = brushed[12]
    filled = clean_mask(wall | cavity, sloppy, axis=0)
    assert filled[cavity & (np.arange(24)[:, None, None] != 12)].all()


def test_a_painted_ring_propagates_as_a_ring():
    """The wall round a cavity (myocardium, a vessel or bladder wall): the cavity stays out."""
    array, wall, cavity = _ring_volume()
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 6.0))
    support = np.zeros_like(wall)
    support[12] = wall[12]
    result = propagate(image, support, None, PropagationOptions(mode="registration"))
    mask = result.mask > 0
    assert dice(mask, wall) > 0.9
    assert (mask & cavity).sum() < 0.02 * cavity.sum()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hole_filling_equals_scipy_slice_by_slice(axis):
    from scipy import ndimage
    from FewShotSegLib.postprocessing import fill_holes_per_slice
    mask = np.random.default_rng(axis).random((7, 30, 40)) > 0.4
    expected = np.moveaxis(np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)]), 0, axis)
    np.testing.assert_array_equal(fill_holes_per_slice(mask, axis), expected)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_clean_mask_edge_cases_along_every_axis(axis):
    empty = np.zeros((6, 7, 8), bool)
    assert not clean_mask(empty, empty, axis).any()
    painted = empty.copy()
    index = [slice(None)] * 3
    index[axis] = 3
    painted[tuple(index)] = True                       # a whole painted slice, nothing predicted
    np.testing.assert_array_equal(clean_mask(empty, painted, axis), painted)
    mask = empty.copy()
    mask[0, 0, 0] = True                               # a lone voxel far from the painting
    out = clean_mask(mask, painted, axis)
    np.testing.assert_array_equal(out, painted)              # dropped: not connected


def test_metrics_known_values():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True
    b[2:6, 2:6, 3:7] = True
    assert dice(a, b) == pytest.approx(2 * 48 / 128)
    assert iou(a, b) == pytest.approx(48 / 80)
    assert hd95(a, a) == 0.0
    assert hd95(a, b, spacing=(1, 1, 2)) == pytest.approx(2.0)
    assert hd95(a, np.zeros_like(a)) == float("inf")
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_test_time_options_do_not_stick_to_the_loaded_model():
    """Query prototypes and support refinement are the run's choice: the (cached) model
    comes back as it was loaded, and a bad step count is refused before any work."""
    import SimpleITK as sitk
    from FewShotSegLib.models import build_model
    from FewShotSegLib.preprocessing import PreprocessConfig

    class Loaded:   # what propagate reads of a LoadedCheckpoint
        model = build_model("alpnet", pretrained=False).eval()
        preprocess = PreprocessConfig(size=64)

    volume = np.random.default_rng(0).normal(size=(6, 48, 48)).astype(np.float32)
    support = np.zeros(volume.shape, bool)
    support[3, 15:30, 15:30] = True
    image = sitk.GetImageFromArray(volume)
    result = propagate(image, support, Loaded, PropagationOptions(query_prototypes=True, registration_weight=0,
                                                                  support_refinement_steps=5))
    assert result.mask[3].any()
    assert Loaded.model.config["query_prototypes"] is False
    assert Loaded.model.config["support_refinement_steps"] == 0
    for bad in (-2, 2.5, None, float("inf"), True):
        with pytest.raises(FewShotSegError, match="support_refinement_steps"):
            propagate(image, support, Loaded, PropagationOptions(support_refinement_steps=bad))
    with pytest.raises(FewShotSegError, match="registration_shrink"):
        PropagationOptions(registration_shrink=None).validate()
    for name in ("multi_scale", "query_prototypes", "postprocess"):
        with pytest.raises(FewShotSegError, match=f"{name} must be true or false, not 'yes'"):
            PropagationOptions(**{name: "yes"}).validate()
    PropagationOptions(multi_scale=1.0, postprocess=0).validate()  # the benchmarks pass numbers


def test_multi_scale_model_averages_its_member_over_grid_sizes():
    """MultiScaleModel keeps the model interface: one packed feature tensor per slice
    (so the propagation's cache and support stacking work unchanged), and its logits
    softmax to the mean of the member's probabilities at each scale, resampled back."""
    import torch.nn.functional as F
    from FewShotSegLib.models.multiscale import MultiScaleModel
    torch.manual_seed(0)
    member = build_model("alpnet", pretrained=False).eval()
    images = torch.rand(3, 1, 64, 64)
    masks = torch.zeros(1, 64, 64)
    masks[0, 20:40, 10:30] = 1

    def probs(model, imgs, m):
        feats = model.encode(imgs)
        return torch.softmax(model.segment(feats[:1], m, feats[1:]), 1)

    def resized(x, side):
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)

    with torch.inference_mode():
        assert torch.allclose(probs(MultiScaleModel(member, 64, (1.0,)), images, masks),
                              probs(member, images, masks), atol=1e-5)
        wrapped = MultiScaleModel(member, 64, (1.0, 1.5))
        feats = wrapped.encode(images)
        assert feats.dim() == 3 and feats.shape[0] == 3     # [N, C, packed cells]
        enlarged = resized(probs(member, resized(images, 96), resized(masks[None], 96)[0]), 64)
        expected = (probs(member, images, masks) + enlarged) / 2
        assert torch.allclose(probs(wrapped, images, masks), expected, atol=1e-5)
        with pytest.raises(FewShotSegError, match="not packed"):
            wrapped.segment(feats[:1, :, :-1], masks, feats[1:, :, :-1])
    assert wrapped.config is member.config and wrapped.name == "alpnet"
    with pytest.raises(FewShotSegError, match="multi-scale"):
        MultiScaleModel(member, 64, (0.0, 1.0))


def test_propagation_multi_scale_option_runs_both_modes_and_changes_the_probabilities():
    class Loaded:   # what propagate reads of a LoadedCheckpoint
        model = build_model("alpnet", pretrained=False).eval()
        preprocess = PreprocessConfig(size=64)

    rng = np.random.default_rng(0)
    volume = rng.normal(size=(6, 48, 48)).astype(np.float32)
    volume[:, 15:30, 15:30] += 3.0
    support = np.zeros(volume.shape, bool)
    support[3, 15:30, 15:30] = True
    image = sitk.GetImageFromArray(volume)
    for mode in ("chained", "direct"):
        plain = propagate(image, support, Loaded, PropagationOptions(mode=mode, registration_weight=0))
        multi = propagate(image, support, Loaded, PropagationOptions(mode=mode, registration_weight=0,
                                                                     multi_scale=True))
        assert multi.mask.shape == volume.shape and multi.mask[3].astype(bool).tolist() == support[3].tolist()
        assert not np.allclose(multi.probability, plain.probability, atol=1e-4)


def test_support_zoom_enlarges_about_the_organ_and_adds_supports():
    """The zoomed copy grows the organ about its own centre; SupportZoomModel scores the
    queries against the support plus its zoomed copies (as the member would, given them),
    and its packed features survive the protocol's mirror and multi-scale wrappers."""
    from FewShotProtocol import predictors as EP
    from FewShotSegLib.models.support_zoom import SupportZoomModel, mask_centre, zoom_about
    mask = torch.zeros(64, 64)
    mask[10:20, 30:50] = 1                        # rows 10-19, cols 30-49
    cy, cx = mask_centre(mask)
    assert cy == pytest.approx((15 + 0.0) / 32 - 1) and cx == pytest.approx(40 / 32 - 1)
    assert torch.allclose(zoom_about(mask[None], 1.0, (cy, cx), "zeros")[0], mask, atol=1e-4)
    bigger = zoom_about(mask[None], 1.5, (cy, cx), "zeros")[0] > 0.5
    assert 2.0 < bigger.sum() / mask.sum() < 2.5 and bigger[15, 40] and not bigger[15, 60]
    assert mask_centre(torch.zeros(8, 8)) == (0.0, 0.0)

    torch.manual_seed(0)
    member = build_model("alpnet", pretrained=False).eval()
    wrapped = SupportZoomModel(member, (1.25,))
    images = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        packed = wrapped.encode(images)
        got = wrapped.segment(packed[:1], mask[None], packed[1:])
        centre = mask_centre(mask)
        zoomed = zoom_about(images[0], 1.25, centre, "border")
        feats = member.encode(torch.cat([images[:1], zoomed[None]]))
        want = member.segment(feats, torch.stack([mask, zoom_about(mask[None], 1.25, centre, "zeros")[0]]),
                              member.encode(images[1:]))
        assert torch.allclose(got, want, atol=1e-5)
        with pytest.raises(FewShotSegError, match="not packed"):
            wrapped.segment(packed[:1, :-1], mask[None], packed[1:, :-1])
        net = EP.ModelPredictor(wrapped, PreprocessConfig(size=64))
        tta = EP.MultiScalePredictor(EP.MirrorAveragePredictor(net), (1.0, 1.5))
        prepared = tta.prepare(images[:, 0])
        probs = tta.predict(prepared[0], mask, prepared[[1, 2]])
    assert probs.shape == (2, 64, 64) and bool(((probs >= 0) & (probs <= 1)).all())
    assert wrapped.config is member.config and wrapped.name == "alpnet"
    with pytest.raises(FewShotSegError, match="support zoom"):
        SupportZoomModel(member, ())
