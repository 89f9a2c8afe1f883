"""Trimming what a walk carried onto other tissue (postprocessing.trimmed_unlike, learned mode)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FewShotSegLib.checkpoints import load_for_mode
from FewShotSegLib.imageio import read_image
from FewShotSegLib.metrics import dice
from FewShotSegLib.model_store import DEFAULT_PROPAGATOR, list_model_files
from FewShotSegLib.postprocessing import trimmed_unlike
from FewShotSegLib.propagation import PropagationOptions, propagate

SHIPPED = DEFAULT_PROPAGATOR in {e.name for e in list_model_files()}


def _scene():
    """Three slices of an organ (intensity 100) beside a darker neighbour (40): on slice 1
    the mask also covers the neighbour, a vessel inside the organ (200) and the organ's
    one-pixel dark rim; slice 0 is painted and covers the neighbour too."""
    y, x = np.mgrid[:64, :64]
    organ = (x - 24) ** 2 + (y - 32) ** 2 <= 14 ** 2
    neighbour = (x >= 38) & (x < 52) & (abs(y - 32) < 8)
    vessel = (x - 22) ** 2 + (y - 30) ** 2 <= 3 ** 2
    rim = organ & ~((x - 24) ** 2 + (y - 32) ** 2 <= 13 ** 2)
    image = np.full((3, 64, 64), 10.0, np.float32)
    image[:, organ] = 100.0
    image[:, rim] = 60.0
    image[:, vessel] = 200.0
    image[:, neighbour] = 40.0
    mask = np.zeros((3, 64, 64), bool)
    mask[:, organ | neighbour] = True
    support = np.zeros_like(mask)
    support[0] = organ & ~rim
    return image, mask, support, organ, neighbour


def test_a_carried_neighbour_is_cut_and_the_rest_kept():
    image, mask, support, organ, neighbour = _scene()
    out = trimmed_unlike(mask, image, support, spacing_mm=1.0)
    assert np.array_equal(out[0], mask[0])            # a painted slice is never touched
    near = ndimage.binary_dilation(neighbour, iterations=2)
    for z in (1, 2):
        assert not (out[z] & ~organ).any()            # the neighbour reaches the edge: cut
        assert not (organ & ~out[z] & ~near).any()    # vessel (a hole) and thin rim kept,
        assert (organ & ~out[z]).sum() < 20           # but the rim along the cut


def test_nothing_is_cut_without_painting_or_where_intensities_agree():
    image, mask, support, organ, neighbour = _scene()
    assert np.array_equal(trimmed_unlike(mask, image, np.zeros_like(support), 1.0), mask)
    alike = image.copy()
    alike[:, neighbour] = 100.0
    assert np.array_equal(trimmed_unlike(mask, alike, support, 1.0), mask)
    # a 1.0 mm opening would remove the neighbour strip only if it were wider than the
    # opening: at 10 mm pixels (radius 1) a strip 14 px wide is still cut
    assert not (trimmed_unlike(mask, image, support, 10.0)[1] & neighbour).any()


def test_the_trim_leaves_a_painted_ring_its_cavity():
    """A wall round a cavity (a ring painted on slice 0; on slices 1-2 the walk's ring and
    a darker neighbour carried beside it): the neighbour is cut and the cavity stays open;
    filling holes is the clean-up's call (it keeps a painted ring's cavity)."""
    y, x = np.mgrid[:64, :64]
    r = np.hypot(x - 30, y - 32)
    wall, cavity = (r >= 8) & (r < 14), r < 8
    neighbour = (x >= 44) & (x < 58) & (abs(y - 32) < 7)
    image = np.full((3, 64, 64), 10.0, np.float32)
    image[:, wall], image[:, cavity], image[:, neighbour] = 100.0, 200.0, 40.0
    mask = np.zeros((3, 64, 64), bool)
    mask[:, wall | neighbour] = True
    support = np.zeros_like(mask)
    support[0] = wall
    out = trimmed_unlike(mask, image, support, spacing_mm=1.0)
    for z in (1, 2):
        assert (out[z] & neighbour).sum() < 0.1 * neighbour.sum() and not (out[z] & cavity).any()
        assert (wall & out[z]).sum() > 0.95 * wall.sum()


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_the_trim_removes_a_liver_carried_onto_its_neighbours(chaos_dir, tmp_path):
    """CHAOS-T2 case 1, liver, one painted slice: the walk carries the left lobe on where it
    ends; the trim (opt-in, learned mode) cuts voxels that are mostly not liver, raises
    the Dice and keeps the painted slice exact; off by default."""
    image = read_image(chaos_dir / "image_1.nii.gz")
    truth = sitk.GetArrayFromImage(read_image(chaos_dir / "label_1.nii.gz", label=True)) == 1
    z = int(np.argmax(truth.sum((1, 2))))
    support = np.zeros_like(truth)
    support[z] = truth[z]
    stepper = load_for_mode(None, "learned")
    plain = propagate(image, support, stepper, PropagationOptions()).mask > 0
    trimmed = propagate(image, support, stepper, PropagationOptions(trim_unlike=True)).mask > 0
    cut = plain & ~trimmed
    assert not (trimmed & ~plain).any() and cut.sum() > 1000
    assert (cut & ~truth).sum() > 0.65 * cut.sum()   # 0.77 when written
    assert dice(trimmed, truth) > dice(plain, truth) + 0.01
    assert np.array_equal(trimmed[z], truth[z])
    # the command's --trim-unlike reaches the engine
    from FewShotSegLib import cli
    support_path, out = tmp_path / "support.nii.gz", tmp_path / "out.nii.gz"
    painted = sitk.GetImageFromArray(support.astype(np.uint8))
    painted.CopyInformation(image)
    sitk.WriteImage(painted, str(support_path))
    args = ["propagate", str(chaos_dir / "image_1.nii.gz"), "--support", str(support_path), "-q", "-o", str(out)]
    assert cli.main(args + ["--trim-unlike"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0, trimmed)


def test_the_trim_outside_learned_mode_says_it_did_nothing(chaos_dir):
    image = read_image(chaos_dir / "image_1.nii.gz")
    truth = sitk.GetArrayFromImage(read_image(chaos_dir / "label_1.nii.gz", label=True)) == 2
    z = int(np.argmax(truth.sum((1, 2))))
    support = np.zeros_like(truth)
    support[z] = truth[z]
    plain = propagate(image, support, None, PropagationOptions(mode="registration"))
    asked = propagate(image, support, None, PropagationOptions(mode="registration", trim_unlike=True))
    assert np.array_equal(plain.mask, asked.mask)
    assert any("trim_unlike applies to the step network" in w for w in asked.warnings)
    assert not any("trim_unlike" in w for w in plain.warnings)
