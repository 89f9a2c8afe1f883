"""Our torch demons against SimpleITK's DemonsRegistrationFilter, on real CHAOS-T2 slices.

The engine's registration is written in torch for speed (registration.py says why); this
is where it must agree with the reference implementation it follows.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from FewShotSegLib import registration as R
from FewShotSegLib.imageio import read_image
from FewShotSegLib.preprocessing import PreprocessConfig, prepare_volume


def _dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def _sitk_carry(fixed, moving, mask, shrink=2, iterations=40):
    """The same recipe with SimpleITK's filter: field at 1/shrink, full-resolution warp."""
    f, m = (R._shrunk(torch.from_numpy(a)[None], shrink)[0].numpy() for a in (fixed, moving))
    demons = sitk.DemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(R.DEMONS_SMOOTHING)
    field = sitk.GetArrayFromImage(demons.Execute(sitk.GetImageFromArray(f), sitk.GetImageFromArray(m)))
    field = torch.from_numpy(field).permute(2, 0, 1).flip(0).float()          # (x, y) -> (y, x)
    full = F.interpolate(field[None], size=fixed.shape, mode="bilinear", align_corners=False)[0] * shrink
    return R.warp_mask(mask, full)


def _pairs(chaos_dir):
    """(fixed, moving, moving mask, fixed truth) for each organ of case 1, two slices apart."""
    image = read_image(chaos_dir / "image_1.nii.gz")
    label = sitk.GetArrayFromImage(read_image(chaos_dir / "label_1.nii.gz", label=True))
    prepared = prepare_volume(image, "axial", PreprocessConfig())
    for organ in (1, 2, 3, 4):
        masks = prepared.mask_to_model(label == organ).numpy()
        present = np.flatnonzero(masks.reshape(len(masks), -1).sum(1) > 0)
        z = int(present[len(present) // 2])
        yield (prepared.model_slices([z + 2])[0].numpy(), prepared.model_slices([z])[0].numpy(), masks[z],
               masks[z + 2] > 0.5)


def test_torch_demons_match_simpleitk_on_real_slices(chaos_dir):
    for fixed, moving, mask, truth in _pairs(chaos_dir):
        ours = R.carry_mask(fixed, moving, mask, shrink=2) >= 0.5
        reference = _sitk_carry(fixed, moving, mask) >= 0.5
        assert _dice(ours, reference) > 0.95
        # and the registration does its job: closer to the truth than copying the mask
        assert _dice(ours, truth) >= _dice(mask > 0.5, truth) - 0.01


def test_batched_fields_equal_one_pair_at_a_time(chaos_dir):
    pairs = list(_pairs(chaos_dir))
    fixed = torch.from_numpy(np.stack([p[0] for p in pairs]))
    moving = torch.from_numpy(np.stack([p[1] for p in pairs]))
    batched = R.slice_fields(fixed, moving)
    for k, (f, m, mask, _) in enumerate(pairs):
        np.testing.assert_allclose(R.warp_mask(mask, batched[k]), R.carry_mask(f, m, mask), atol=1e-3)


def test_field_cache_carries_along_the_chain(chaos_dir):
    """FieldCache.carry(chain, k) is the pair (chain[k] -> chain[k+1]), whatever the batch
    boundaries, and a pair estimated for one walk serves the next walk over it."""
    from FewShotSegLib.walks import FieldCache, SliceImages

    image = read_image(chaos_dir / "image_1.nii.gz")
    prepared = prepare_volume(image, "axial", PreprocessConfig())
    view = lambda i: prepared.model_slices([i])[0].numpy()  # noqa: E731
    chain = [10] + list(range(11, 11 + R.FIELD_BATCH + 3))
    fields = FieldCache(SliceImages(prepared), R.REGISTRATION_SHRINK, R.DEMONS_ITERATIONS)
    mask = np.zeros(view(10).shape, np.float32)
    mask[100:140, 90:150] = 1
    for k in (0, R.FIELD_BATCH + 1):
        expected = R.carry_mask(view(chain[k + 1]), view(chain[k]), mask)
        np.testing.assert_allclose(fields.carry(chain, k, mask), expected, atol=1e-3)
    known = len(fields.fields)
    fields.carry(chain[3:], 0, mask)
    assert len(fields.fields) == known


def test_identical_slices_leave_the_mask_in_place():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), np.float32)
    mask[20:40, 24:44] = 1
    carried = R.carry_mask(image, image, mask, shrink=2)
    assert carried.shape == mask.shape
    np.testing.assert_allclose(carried, mask, atol=1e-5)


def test_a_shifted_square_is_followed():
    """A bright square moved by 3 pixels: the carried mask moves with it."""
    square = np.zeros((96, 96), np.float32)
    square[30:60, 30:60] = 1.0
    square = torch.from_numpy(square)[None, None]
    moving = F.avg_pool2d(F.pad(square, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0].numpy()  # soft edges
    fixed = np.roll(moving, 3, axis=1)
    carried = R.carry_mask(fixed, moving, (moving > 0.5).astype(np.float32), shrink=1, iterations=80) >= 0.5
    target = fixed > 0.5
    assert _dice(carried, target) > _dice(moving > 0.5, target) + 0.03


def test_a_coarse_first_estimate_follows_a_larger_motion():
    """A disc (radius 20) moved by 16 pixels: on the 4x-shrunk grid alone the demons forces
    (local gradients) follow it only in part; started from an 8x-shrunk estimate the field
    follows it (PropagationOptions.registration_coarse_shrink)."""
    yy, xx = np.mgrid[:128, :128]
    disc = ((yy - 64) ** 2 + (xx - 50) ** 2 <= 20 ** 2).astype(np.float32)
    moving = F.avg_pool2d(torch.from_numpy(disc)[None, None], 5, stride=1, padding=2,
                          count_include_pad=False)[0, 0].numpy()
    fixed = np.roll(moving, 16, axis=1)
    images = [torch.from_numpy(np.ascontiguousarray(a))[None] for a in (fixed, moving)]
    target, mask = fixed > 0.5, (moving > 0.5).astype(np.float32)
    fine = R.warp_mask(mask, R.slice_fields(*images, shrink=4)[0]) >= 0.5
    started = R.warp_mask(mask, R.slice_fields(*images, shrink=4, coarse_shrink=8)[0]) >= 0.5
    assert _dice(started, target) > 0.99 and _dice(fine, target) < 0.9
    # off (0) or not coarser than the fine grid: exactly the single-grid field
    for off in (0, 4, 2):
        assert torch.equal(R.slice_fields(*images, shrink=4, coarse_shrink=off), R.slice_fields(*images, shrink=4))
