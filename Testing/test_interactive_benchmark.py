"""benchmarks/interactive_benchmark.py: the simulated user's choices, and a quick run on real
data (Fill between slices via ITK's contour interpolator, and the engine, two rounds on one
CHAOS-T2 structure, in a subprocess: importing ITK takes about 13 s of CPU)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "interactive_benchmark.py"
ITK_MISSING = importlib.util.find_spec("itk") is None


def _bench():
    spec = importlib.util.spec_from_file_location("interactive_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worst_slice_and_inputs():
    bench = _bench()
    truth = np.zeros((6, 5, 5), bool)
    truth[1:4, 1:4, 1:4] = True
    pred = np.zeros_like(truth)
    pred[2] = truth[2]
    pred[5, :2, :] = True                     # 10 wrong voxels on a slice where it is absent
    assert bench.worst_slice(pred, truth, 0, {2}) == 5
    assert bench.worst_slice(pred, truth, 0, {2}, present_only=True) in (1, 3)   # 9 each
    assert bench.worst_slice(truth, truth, 0, set()) is None
    support, exclude = bench.inputs_for(truth, 0, [2], [5])
    assert support[2].sum() == 9 and support.sum() == 9
    assert exclude[5].all() and exclude.sum() == 25
    assert bench.inputs_for(truth, 0, [2], [])[1] is None


@pytest.mark.skipif(ITK_MISSING, reason="Fill between slices needs: pip install itk-morphologicalcontourinterpolation")
def test_quick_run_on_real_data(chaos_dir, tmp_path):
    out = tmp_path / "interactive_quick.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--cases", "1", "--methods", "fill,fewshot",
           "--rounds", "2", "--out", str(out), "--data", str(chaos_dir.parent)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert {"date", "hardware", "settings", "summary", "structures"} <= set(payload)
    assert payload["hardware"]["threads"] == 1
    chaos = payload["summary"]["chaos"]
    assert set(chaos) == {"fill", "fewshot"}
    for method, summary in chaos.items():
        assert summary["structures"] == 1
        assert set(summary["mean_dice"]) == {"1", "2"}
        assert all(0.0 <= v <= 1.0 for v in summary["mean_dice"].values())
        assert summary["seconds_first"] > 0 and summary["seconds_repropagation"] > 0
        assert summary["errors"] == 0
    assert chaos["fill"]["mean_dice"]["2"] >= chaos["fill"]["mean_dice"]["1"]
    assert chaos["fewshot"]["mean_dice"]["1"] > chaos["fill"]["mean_dice"]["1"]
    # Fill between slices with one painted slice returns that slice: Dice = 2|S| / (|S| + |T|)
    import SimpleITK as sitk
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(chaos_dir / "label_1.nii.gz"))) == 1
    largest = truth.reshape(truth.shape[0], -1).sum(1).max()
    assert chaos["fill"]["mean_dice"]["1"] == pytest.approx(2 * largest / (largest + truth.sum()), abs=1e-4)
    records = payload["structures"]
    assert [(r["case"], r["organ"]) for r in records] == [("1", "liver")] * 2
    assert all(len(r["dice"]) == 2 and len(r["picks"]) == 2 for r in records)
    # resume: a second run finds both records there and adds nothing
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "resuming" in again.stdout
    assert len(json.loads(out.read_text())["structures"]) == 2


def test_label_array_follows_physical_space(tmp_path):
    """A label file whose rows run the other way than its scan's (as the TotalSegmentator
    DICOM example's do) is read in the scan's voxel order, not mirrored."""
    import SimpleITK as sitk
    from FewShotSegLib.evaluation import label_array
    truth = np.zeros((4, 6, 5), np.uint8)
    truth[1:3, 0:2, 1:4] = 1                               # near the first row
    image = sitk.GetImageFromArray(np.zeros(truth.shape, np.float32))
    flipped = sitk.GetImageFromArray(truth[:, ::-1, :].copy())
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    flipped.SetOrigin((0.0, 5.0, 0.0))                     # its first row is the scan's last
    sitk.WriteImage(flipped, str(tmp_path / "seg.nii.gz"))
    assert np.array_equal(label_array(tmp_path / "seg.nii.gz", image), truth)
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), truth)   # the array alone is mirrored


def test_dev_ct_labels_lie_on_their_tissue(shared_data):
    """The CT liver and spleen the benchmark scores lie on soft tissue (about 30-80 HU) in
    every development scan; a mirrored label would cover air, fat and bone."""
    bench = _bench()
    found = 0
    for dataset, case, organ, image, truth, _ in bench.totalseg_structures(shared_data, ["liver", "spleen"], "dev_ct"):
        import SimpleITK as sitk
        values = sitk.GetArrayViewFromImage(image)[truth]
        assert 20 <= float(np.median(values)) <= 150, (case, organ, float(np.median(values)))
        found += 1
    assert found >= 2


def test_inverted_intensities_keep_the_geometry(tmp_path, capsys):
    """--invert turns intensities upside down on the same grid; a results file written on the
    other intensities is not resumed."""
    import SimpleITK as sitk
    bench = _bench()
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    image.SetSpacing((0.8, 0.9, 3.0))
    image.SetOrigin((1.0, -2.0, 5.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    out = bench.inverted(image)
    assert np.array_equal(sitk.GetArrayFromImage(out), 23 - np.arange(24).reshape(2, 3, 4))
    assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == \
        (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    results = tmp_path / "done.json"
    options = "PropagationOptions() defaults; registration: mode='registration'"
    results.write_text(json.dumps({"settings": {"rounds": 6, "options": options}, "structures": []}))
    with pytest.raises(SystemExit):
        bench.main(["--invert", "--methods", "registration", "--out", str(results), "--data", str(tmp_path)])
    assert "holds a run on as stored intensities" in capsys.readouterr().err


def test_a_run_painted_in_another_plane_is_not_resumed(tmp_path, capsys):
    """--plane coronal slices across the index axis nearest the coronal direction; a results
    file of axial painting is not resumed into it."""
    bench = _bench()
    results = tmp_path / "axial.json"
    options = "PropagationOptions() defaults; registration: mode='registration'"
    results.write_text(json.dumps({"settings": {"rounds": 6, "options": options}, "structures": []}))
    with pytest.raises(SystemExit):
        bench.main(["--plane", "coronal", "--methods", "registration", "--out", str(results), "--data", str(tmp_path)])
    assert "painted in the axial plane" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--tilt", "25", "--methods", "registration", "--out", str(results), "--data", str(tmp_path)])
    assert "tilted by 0.0 degrees" in capsys.readouterr().err


def test_a_user_painting_coronal_slices(chaos_dir):
    """The simulated user paints coronal slices of a real CHAOS kidney (the volume's slice
    axis is axial): the engine finds that plane from the painting, fills the kidney from one
    painted slice, and a second painted slice does not make it worse."""
    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.evaluation import load_chaos_case
    from FewShotSegLib.imageio import array_axis_for
    bench = _bench()
    image, label = load_chaos_case(chaos_dir.parent, "1")
    axis = array_axis_for(image, "coronal")
    assert axis != array_axis_for(image, "axial")
    record = bench.run_structure("learned", image, label == 2, axis, 2, load_for_mode(None, "learned"))
    assert record["axis_mismatch"] == 0 and record["errors"] == 0
    assert record["slices"] == label.shape[axis]
    assert record["dice"][0] > 0.8 and record["dice"][1] >= record["dice"][0] - 0.01, record["dice"]


def test_a_tilted_grid_covers_the_scan_and_keeps_the_structure():
    """--tilt: untilted, the grid is the scan's own; tilted by 25 degrees about the rows'
    direction, its slices lean by 25 degrees, it holds every corner of the scan, and a
    structure resampled onto it keeps its volume."""
    import SimpleITK as sitk
    bench = _bench()
    image = sitk.Image([10, 12, 8], sitk.sitkFloat32)
    image.SetSpacing((0.8, 0.9, 3.0))
    image.SetOrigin((1.0, -2.0, 5.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    same = bench.tilted_grid(image, 0.0)
    assert same.GetSize() == image.GetSize()
    assert np.allclose(same.GetOrigin(), image.GetOrigin()) and np.allclose(same.GetDirection(), image.GetDirection())
    grid = bench.tilted_grid(image, 25.0)
    old, new = np.array(image.GetDirection()).reshape(3, 3), np.array(grid.GetDirection()).reshape(3, 3)
    assert np.allclose(new[:, 0], old[:, 0])                         # turned about the rows' direction
    assert np.degrees(np.arccos(new[:, 2] @ old[:, 2])) == pytest.approx(25.0)
    for corner in ((0, 0, 0), (9, 11, 7), (0, 11, 7), (9, 0, 0)):
        index = grid.TransformPhysicalPointToContinuousIndex(image.TransformIndexToPhysicalPoint(corner))
        assert all(-1e-6 <= c <= n - 1 + 1e-6 for c, n in zip(index, grid.GetSize()))
    truth = np.zeros((8, 12, 10), bool)
    truth[2:6, 3:9, 2:8] = True
    moved, mask = bench.tilted(image, 25.0), bench.tilted(image, 25.0, truth)
    assert mask.shape == sitk.GetArrayViewFromImage(moved).shape
    assert abs(int(mask.sum()) - int(truth.sum())) < 0.15 * truth.sum()


def test_the_top_three_user_corrects_the_worst_listed_slice(chaos_dir):
    """learned_top3: after the first run on a real CHAOS liver the user's next slice is one
    of the three the tool lists first, the one of them with the most wrong voxels (at least
    as wrong as the first suggestion, which learned_suggest would take)."""
    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.evaluation import load_chaos_case
    from FewShotSegLib.propagation import PropagationOptions, propagate
    bench = _bench()
    image, label = load_chaos_case(chaos_dir.parent, "2")
    truth = label == 1
    stepper = load_for_mode(None, "learned")
    record = bench.run_structure("learned_top3", image, truth, 0, 2, stepper)
    support, exclude = bench.inputs_for(truth, 0, [record["picks"][0]], [])
    first = propagate(image, support, stepper, PropagationOptions(mode="learned"), exclude=exclude)
    listed = [int(s.slice) for s in first.suggestions[:3]]
    wrong = bench.slice_counts((first.mask > 0) != truth, 0)
    assert record["picks"][1] in listed and wrong[record["picks"][1]] == max(wrong[i] for i in listed)
    assert wrong[record["picks"][1]] >= wrong[listed[0]]
