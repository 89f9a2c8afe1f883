"""Several structures propagated at once (FewShotSegLib/structures.py): the voxels two
results claim go to the structure painted nearest, painted voxels stay with their
structure; on a real CHAOS-T2 case, the command and the engine."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegLib.cli import main
from FewShotSegLib.evaluation import largest_slice_support, load_chaos_case
from FewShotSegLib.metrics import dice
from FewShotSegLib.structures import Claim, propagate_structures, resolve_overlaps


def _claim(value, mask, probability, painted_slices, support=None, spacing=2.0):
    box = (slice(0, mask.shape[0]), slice(0, mask.shape[1]), slice(0, mask.shape[2]))
    support = np.zeros_like(mask) if support is None else support
    return Claim(value, box, mask, np.asarray(probability, np.float32), support, 0,
                 np.asarray(painted_slices, float) * spacing, spacing)


def test_a_contested_voxel_goes_to_the_structure_painted_nearest():
    shape = (10, 4, 4)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[0:7], b[4:10] = True, True                      # slices 4-6 claimed by both
    prob_a = np.full(shape, 0.9)                      # a is more confident everywhere
    prob_b = np.full(shape, 0.6)
    labels, contested, reassigned = resolve_overlaps(
        [_claim(1, a, prob_a, [1]), _claim(2, b, prob_b, [8])], shape)
    assert contested == 3 * 16
    assert (labels[:4] == 1).all() and (labels[7:] == 2).all()
    assert (labels[4] == 1).all()                     # 3 slices from a's painting, 4 from b's
    assert (labels[5:7] == 2).all()                   # nearer b's painting although a is surer
    assert reassigned == {1: 2 * 16, 2: 16}


def test_equally_near_goes_to_the_higher_probability_and_painted_voxels_stay():
    shape = (5, 4, 4)
    a, b = np.ones(shape, bool), np.ones(shape, bool)
    prob_a, prob_b = np.full(shape, 0.7), np.full(shape, 0.8)
    painted_a = np.zeros(shape, bool)
    painted_a[2, 0, 0] = True
    labels, _, _ = resolve_overlaps([_claim(1, a, prob_a, [2], painted_a), _claim(2, b, prob_b, [2])], shape)
    assert labels[2, 0, 0] == 1                       # painted for a: a's, whatever b says
    assert (labels[labels != 1] == 2).all() and (labels == 1).sum() == 1


def test_claims_stored_as_boxes_resolve_in_the_right_place():
    shape = (8, 20, 20)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2:6, 3:9, 3:9], b[2:6, 7:15, 7:15] = True, True
    box_a, box_b = (slice(2, 6), slice(3, 9), slice(3, 9)), (slice(2, 6), slice(7, 15), slice(7, 15))
    claims = [Claim(1, box_a, a[box_a], np.full(a[box_a].shape, 0.9, np.float32), np.zeros(a[box_a].shape, bool),
                    0, np.array([2.0]), 1.0),
              Claim(2, box_b, b[box_b], np.full(b[box_b].shape, 0.5, np.float32), np.zeros(b[box_b].shape, bool),
                    0, np.array([5.0]), 1.0)]
    labels, contested, _ = resolve_overlaps(claims, shape)
    overlap = a & b
    assert contested == overlap.sum()
    assert (labels[2:4][overlap[2:4]] == 1).all() and (labels[4:6][overlap[4:6]] == 2).all()
    assert ((labels == 1) == (a & ~(overlap & (np.arange(8)[:, None, None] >= 4)))).all()


@pytest.fixture(scope="module")
def default_model():
    from FewShotSegLib.checkpoints import load_for_mode
    return load_for_mode(None, "auto")       # the shipped default (the step network)


@pytest.fixture(scope="module")
def case_20(shared_data):
    image, label = load_chaos_case(shared_data, "20")
    support = np.zeros(label.shape, np.uint8)
    for value in (1, 2, 3, 4):
        painted, _ = largest_slice_support(label == value, 0)
        support[painted] = value
    return image, label, support


def test_all_four_organs_of_a_real_case_at_once(case_20, default_model):
    """Every painted slice exact, no voxel in two structures, and better than each organ
    alone on this case (a development case, where the spleen's walk runs onto the left kidney)."""
    from FewShotSegLib.propagation import propagate
    image, label, support = case_20
    result = propagate_structures(image, support, default_model)
    assert set(np.unique(result.labels)) == {0, 1, 2, 3, 4} and result.contested > 0
    for value in (1, 2, 3, 4):
        painted = np.flatnonzero((support == value).any(axis=(1, 2)))
        for i in painted:
            assert np.array_equal(result.labels[i] == value, support[i] == value), (value, i)
    together = np.mean([dice(result.labels == v, label == v) for v in (1, 2, 3, 4)])
    alone = np.mean([dice(propagate(image, support == v, default_model).mask.astype(bool), label == v)
                     for v in (1, 2, 3, 4)])
    assert together > alone + 0.02, (together, alone)


def test_a_slice_marked_absent_for_one_structure_leaves_the_others(case_20, default_model):
    image, label, support = case_20
    spleen = np.flatnonzero((label == 4).any(axis=(1, 2)))
    kidney = np.flatnonzero((label == 3).any(axis=(1, 2)))
    painted = int(np.flatnonzero((support == 4).any(axis=(1, 2)))[0])
    absent = painted - 2                               # the spleen 'absent' two slices below its painting
    assert absent in kidney and absent in spleen
    exclude = np.zeros(label.shape, bool)
    exclude[absent] = True
    result = propagate_structures(image, support, default_model, exclude={4: exclude})
    assert not (result.labels[:absent + 1] == 4).any()
    assert (result.labels[absent] == 3).any()


def _support_file_21(chaos_dir, folder):
    """CHAOS-T2 case 21's right kidney (2) and spleen (4) painted on their largest slices, as
    one label file; returns the label image, its array and the file."""
    label_img = sitk.ReadImage(str(chaos_dir / "label_21.nii.gz"))
    label = sitk.GetArrayFromImage(label_img)
    support = np.zeros_like(label)
    for value in (2, 4):
        painted, _ = largest_slice_support(label == value, 0)
        support[painted] = value
    sup = sitk.GetImageFromArray(support)
    sup.CopyInformation(label_img)
    sitk.WriteImage(sup, str(folder / "support.nii.gz"))
    return label_img, label, folder / "support.nii.gz"


def test_the_command_propagates_every_painted_label(chaos_dir, tmp_path, capsys):
    label_img, label, _ = _support_file_21(chaos_dir, tmp_path)
    out = tmp_path / "out.nii.gz"
    code = main(["propagate", str(chaos_dir / "image_21.nii.gz"), "--support", str(tmp_path / "support.nii.gz"),
                 "-q", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "2 structures (2, 4) propagated" in printed
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(result)) == {0, 2, 4}
    assert dice(result == 2, label == 2) > 0.85 and dice(result == 4, label == 4) > 0.7
    stray = np.zeros_like(label)
    stray[3, :5, :5] = 7                                  # an exclusion for a label nobody painted
    ex = sitk.GetImageFromArray(stray)
    ex.CopyInformation(label_img)
    sitk.WriteImage(ex, str(tmp_path / "exclude.nii.gz"))
    out.unlink()
    code = main(["propagate", str(chaos_dir / "image_21.nii.gz"), "--support", str(tmp_path / "support.nii.gz"),
                 "--exclude", str(tmp_path / "exclude.nii.gz"), "-q", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "label(s) 7" in err[0] and not out.exists()


def test_a_correction_of_one_structure_reuses_the_others_walks(shared_data, default_model, monkeypatch):
    """The session keeps every structure's walks: the cache bound grows with their number
    (least recently used: each structure's walks pushed the next one's out, and a correction
    of one of fourteen CT structures took as long as the first run)."""
    from FewShotSegLib import session as session_module
    from FewShotSegLib.propagation import PropagationSession
    image, label = load_chaos_case(shared_data, "21")
    support = np.zeros(label.shape, np.uint8)
    for value in (1, 2, 3, 4):
        painted, _ = largest_slice_support(label == value, 0)
        support[painted] = value
    probe = PropagationSession()
    propagate_structures(image, support, default_model, session=probe)
    held = probe._walk_bytes()
    monkeypatch.setattr(session_module, "KEEP_WALK_BYTES", held // 3)   # one structure fits, four do not
    session = PropagationSession()
    propagate_structures(image, support, default_model, session=session)
    spleen = np.flatnonzero((label == 4).any(axis=(1, 2)))
    k = int(spleen[len(spleen) // 4])
    support[k][label[k] == 4] = 4                          # the user paints one more spleen slice
    again = propagate_structures(image, support, default_model, session=session)
    assert [again.results[v].walks_computed for v in (1, 2, 3)] == [0, 0, 0]
    assert again.results[4].walks_computed > 0


def test_structures_painted_in_different_planes_each_walk_their_own_axis(case_20, default_model):
    """The liver painted on an axial slice, the spleen on a coronal one: each is carried
    across its own slices, each painting comes back exactly, no voxel is in both."""
    image, label, _ = case_20
    support = np.zeros(label.shape, np.uint8)
    liver_axial, k = largest_slice_support(label == 1, 0)
    spleen_coronal, j = largest_slice_support(label == 4, 1)
    support[liver_axial] = 1
    support[spleen_coronal & ~liver_axial] = 4
    result = propagate_structures(image, support, default_model)
    assert result.results[1].axis_index == 0 and result.results[4].axis_index == 1
    assert np.array_equal(result.labels[k] == 1, support[k] == 1)
    assert np.array_equal(result.labels[:, j] == 4, support[:, j] == 4)
    assert dice(result.labels == 1, label == 1) > 0.7 and dice(result.labels == 4, label == 4) > 0.6


def test_a_wall_and_its_cavity_painted_together_stay_apart(default_model):
    """A ring and what it encloses (myocardium and the blood pool, a bladder wall and its
    lumen), each painted on one slice: the ring keeps its hole, the cavity fills it."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_engine import _ring_volume
    array, wall, cavity = _ring_volume()
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 6.0))
    support = np.zeros(wall.shape, np.uint8)
    support[12][wall[12]] = 2
    support[12][cavity[12]] = 1
    result = propagate_structures(image, support, default_model)
    assert dice(result.labels == 2, wall) > 0.95 and dice(result.labels == 1, cavity) > 0.95
    assert ((result.labels == 2) & cavity).sum() < 0.02 * cavity.sum()


def test_a_structure_that_cannot_be_propagated_is_named_in_one_line(chaos_dir, tmp_path, capsys):
    _support_file_21(chaos_dir, tmp_path)
    out = tmp_path / "out.nii.gz"
    code = main(["propagate", str(chaos_dir / "image_21.nii.gz"), "--support", str(tmp_path / "support.nii.gz"),
                 "--axis", "coronal", "-q", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "label 2: " in err[0] and "disagrees" in err[0] and not out.exists()
