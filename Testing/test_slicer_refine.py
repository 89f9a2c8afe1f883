"""Refine from FewShotSeg's Slicer Logic on real MRML (PyPI slicer-core), a real CHAOS
volume and the shipped refiner.

Why these tests: refinement replaces a segment the user may have worked on for minutes;
it must touch that segment only, be undoable, leave it exactly as it was on any error,
cancel or crashed worker, and put the uncertainty on the image's own grid (k axis reversed
on load) so that the listed slices are where the views jump. In Slicer it runs in the
worker process (Slicer's main loop holds the GIL: a thread of its interpreter barely
runs), so the worker's result must be the command line's and arrive in the command line's
time under such a loop. Few samples and steps keep each run to seconds.
Needs ../shared/data and Resources/Models/fewshotseg-refiner.pt; skips without them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "FewShotSeg"), str(ROOT), str(Path(__file__).resolve().parent)]

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")
import vtk  # noqa: E402

from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegSlicerLib.logic import FewShotSegLogic, segmentationHistory  # noqa: E402
from FewShotSegSlicerLib import geometry  # noqa: E402
from FewShotSegSlicerLib.refinement import (COLOR_NODE_IDS, UNCERTAINTY_ATTRIBUTE,  # noqa: E402
                                            rankSlices)
from test_slicer_logic import (CHAOS_CASE, LIVER, SPLEEN, assertSameSegments, coarseSegmentation,  # noqa: E402
                               dice, sceneNodeIds, sharedCore, snapshot)
from test_slicer_worker import POLL_SECONDS, killMidRun, mainLoop, waitForProgress  # noqa: E402

KIDNEY_R = 2
REFINER = ROOT / "Resources" / "Models" / "fewshotseg-refiner.pt"
FAST = dict(samples=2, steps=2)
# runs cut short: several batches of slices (the refiner checks Cancel between two), each short
# enough that the worker answers a cancel before it is killed for not answering
CUT = dict(samples=2, steps=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is small and busy; the Logic itself leaves torch's threads alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def private_model_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOTSEG_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def fewshot_checkpoint(tmp_path_factory) -> Path:
    """A real (untrained) few-shot checkpoint: the wrong kind of file for Refine."""
    from FewShotSegLib.checkpoints import save_checkpoint
    from FewShotSegLib.models import build_model
    from FewShotSegLib.preprocessing import PreprocessConfig

    path = tmp_path_factory.mktemp("models") / "tiny-fewshot.pt"
    save_checkpoint(path, build_model("alpnet", pretrained=False), preprocess=PreprocessConfig(size=64),
                    provenance={"purpose": "tests"})
    return path


@pytest.fixture
def scene():
    core = sharedCore()
    core.scene.Clear(0)
    yield core
    core.scene.Clear(0)


@pytest.fixture(scope="module")
def logic():
    if not REFINER.is_file():
        pytest.skip(f"no shipped refiner at {REFINER}")
    logic = FewShotSegLogic()
    yield logic
    logic.shutdown()


@pytest.fixture
def case(scene, chaos_dir):
    """CHAOS case: a coarse spleen (eroded 2 voxels in-plane, shifted 3 voxels), liver and
    right kidney complete as bystanders."""
    from scipy import ndimage

    folder = chaos_dir
    image = scene.load(folder / f"image_{CHAOS_CASE}.nii.gz")
    labelNode = scene.load(folder / f"label_{CHAOS_CASE}.nii.gz", labelmap=True)
    label = slicer.util.arrayFromVolume(labelNode).copy()
    truth = label == SPLEEN
    coarse = np.roll(ndimage.binary_erosion(truth, np.ones((1, 5, 5), bool)), 3, axis=2)
    labels = np.zeros_like(label)
    labels[label == LIVER] = LIVER
    labels[label == KIDNEY_R] = KIDNEY_R
    labels[coarse] = SPLEEN
    slicer.util.updateVolumeFromArray(labelNode, labels)
    seg = scene.segmentation(image)
    ids = scene.importLabels(labelNode, seg)
    scene.scene.RemoveNode(labelNode)
    return SimpleNamespace(image=image, seg=seg, spleen=ids[SPLEEN], liver=ids[LIVER], kidney=ids[KIDNEY_R],
                           truth=truth, coarse=coarse, label=label)


def uncertaintyNodes(scene) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())
            if nodes.GetItemAsObject(i).GetAttribute(UNCERTAINTY_ATTRIBUTE)]


def fakeResult(mask, uncertainty=None):
    """Stands in for the engine's output where only applyRefine() is under test."""
    mask = np.asarray(mask, np.uint8)
    uncertainty = np.zeros(mask.shape, np.float32) if uncertainty is None else uncertainty
    return SimpleNamespace(mask=mask, uncertainty=uncertainty, probability=mask.astype(np.float32),
                           seconds=0.0, slices_done=0, network_seconds=0.0)


# -- a real run ----------------------------------------------------------------------------
@pytest.mark.parametrize("inWorker", [False, True], ids=["in-process", "worker"])
def test_refine_replaces_the_segment_only_and_undo_restores_it(logic, scene, case, inWorker):
    history = segmentationHistory(case.seg)
    before = snapshot(case.seg, case.image)
    assert np.array_equal(before[case.spleen], case.coarse)
    nodesBefore = sceneNodeIds(scene.scene)
    saves, seen = [], []
    summary = logic.refine(case.image, case.seg, case.spleen, progress=lambda f, m: seen.append(f),
                           saveStateForUndo=lambda: saves.append(history.SaveState()), worker=inWorker, **FAST)
    print(f"\nCHAOS {CHAOS_CASE} spleen ({'worker' if inWorker else 'in-process'}): {summary.statusText()}")
    assert saves == [True] and seen and max(seen) == 1.0

    after = snapshot(case.seg, case.image)
    assert np.array_equal(after[case.liver], before[case.liver])
    assert np.array_equal(after[case.kidney], before[case.kidney])
    refined = after[case.spleen]
    assert not np.array_equal(refined, case.coarse) and summary.voxelsChanged == int((refined != case.coarse).sum())
    coarseSlices = np.flatnonzero(case.coarse.any((1, 2)))
    assert set(np.flatnonzero(refined.any((1, 2)))) <= set(range(coarseSlices[0] - 1, coarseSlices[-1] + 2))
    score = dice(refined, case.truth)
    print(f"spleen Dice coarse {dice(case.coarse, case.truth):.3f} -> refined {score:.3f}")
    assert score > 0.7  # on the organ: a geometry slip (k axis, transpose) would drop this

    node = summary.uncertaintyVolume
    assert sceneNodeIds(scene.scene) - nodesBefore == {node.GetID(), node.GetDisplayNodeID()}
    assert node.GetName() == f"{case.seg.GetSegmentation().GetSegment(case.spleen).GetName()} uncertainty"
    np.testing.assert_allclose(geometry.ijkToRasArray(node), geometry.ijkToRasArray(case.image))
    uncertainty = slicer.util.arrayFromVolume(node)
    assert uncertainty.shape == case.coarse.shape and uncertainty.dtype == np.float32
    assert np.isfinite(uncertainty).all() and uncertainty.min() >= 0 and uncertainty.max() > 0
    assert node.GetDisplayNode().GetColorNodeID() in COLOR_NODE_IDS
    assert node.GetDisplayNode().GetApplyThreshold()  # zero uncertainty is transparent

    top = summary.topSlices
    sums = uncertainty.reshape(uncertainty.shape[0], -1).sum(1)
    assert 1 <= len(top) <= 10 and top[0].index == int(np.argmax(sums))
    assert [s.score for s in top] == sorted((s.score for s in top), reverse=True)
    rasToIjk = np.linalg.inv(geometry.ijkToRasArray(case.image))
    for s in top:
        assert 0 <= s.index < uncertainty.shape[0] and s.score == pytest.approx(sums[s.index], rel=1e-4)
        i, j, k = (rasToIjk @ np.append(s.position, 1.0))[:3]
        assert round(k, 3) == s.index and 0 <= i < uncertainty.shape[2] and 0 <= j < uncertainty.shape[1]
        assert s.label.startswith(f"Axial slice {s.index} (S ")

    assert history.RestorePreviousState()
    assertSameSegments(before, snapshot(case.seg, case.image))


def test_painted_slice_is_kept_and_uncertainty_volume_reused(logic, scene, case, fewshot_checkpoint):
    """After a propagation from one painted slice, refining keeps that slice exactly."""
    k = int(np.argmax(case.truth.sum((1, 2))))
    painted = np.zeros_like(case.truth)
    painted[k] = case.truth[k]
    paintedId = case.seg.GetSegmentation().AddEmptySegment("painted spleen")
    geometry.writeSegment(case.seg, paintedId, painted, case.image)
    job = logic.prepare(case.image, case.seg, paintedId, model=fewshot_checkpoint, axis="axial")
    propagated = case.coarse.copy()  # the propagation's output: the painted slice + the coarse spleen
    propagated[k] = painted[k]
    logic.apply(job, fakeResult(propagated))
    assert np.array_equal(geometry.segmentToArray(case.seg, paintedId, case.image), propagated)

    existing = scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "painted spleen uncertainty")
    existing.SetAttribute(UNCERTAINTY_ATTRIBUTE, f"{case.seg.GetID()}/{paintedId}")
    summary = logic.refine(case.image, case.seg, paintedId, **FAST)
    assert summary.keptSlices == 1 and "1 painted slice(s) kept" in summary.statusText()
    refined = geometry.segmentToArray(case.seg, paintedId, case.image)
    assert np.array_equal(refined[k], painted[k])
    assert [n.GetID() for n in uncertaintyNodes(scene.scene)] == [existing.GetID()]
    assert summary.uncertaintyVolume.GetID() == existing.GetID()
    assert not slicer.util.arrayFromVolume(existing)[k].any()
    assert k not in [s.index for s in summary.topSlices]
    # the refined slices are the Logic's writing, not the user's: the next Propagate keeps k only
    again = logic.prepare(case.image, case.seg, paintedId, model=fewshot_checkpoint)
    assert again.userSlices == [k] and again.editedSlices == [] and again.axis == "axial"


def test_segment_on_another_grid_is_resampled_and_said_so(logic, scene, case):
    """Segmentation stored on a grid twice as coarse in-plane: read onto the volume's grid."""
    seg, ids = coarseSegmentation(scene, case.image, case.coarse[:, ::2, ::2])
    segmentId = ids[1]
    job = logic.prepareRefine(case.image, seg, segmentId, **FAST)
    assert any("resampled onto the volume's grid" in note for note in job.notes)
    assert dice(job.coarse, case.coarse) > 0.85
    assert not logic.prepareRefine(case.image, case.seg, case.spleen, **FAST).notes  # same grid: no note
    summary = logic.applyRefine(job, fakeResult(case.truth))
    assert "resampled" in summary.statusText()
    assert dice(geometry.segmentToArray(seg, segmentId, case.image), case.truth) > 0.9


def test_rank_slices_positions_follow_the_volume_transform(scene, case):
    uncertainty = np.zeros(case.coarse.shape, np.float32)
    uncertainty[7, 100, 50] = 2.0
    uncertainty[7, 102, 50] = 2.0
    uncertainty[3, 10, 10] = 1.0
    transform = scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 30.0)
    transform.SetMatrixTransformToParent(shift)
    case.image.SetAndObserveTransformNodeID(transform.GetID())
    top = rankSlices(uncertainty, 0, case.image, "axial", count=5)
    assert [s.index for s in top] == [7, 3] and top[0].score == pytest.approx(4.0)
    expected = geometry.ijkToRasArray(case.image) @ np.array([50, 101, 7, 1.0])
    np.testing.assert_allclose(top[0].position, expected[:3] + [30.0, 0, 0], atol=1e-6)


# -- bad inputs: a clear message and the segmentation exactly as before --------------------
@pytest.mark.parametrize("what, match", [
    ("empty segment", "is empty: nothing to refine"),
    ("samples 0", "samples must be an integer from 1"),
    ("steps 51", "steps must be an integer from 1 to 50"),
    ("few-shot checkpoint as refiner", "but a refiner is needed"),
    ("missing refiner", "checkpoint not found"),
    ("keep slice outside", "outside the 31 axial slices"),
    ("bad axis", "unknown axis"),
    ("bad device", "not available"),
    ("no segment", "no segment selected"),
])
def test_bad_inputs_leave_everything_as_it_was(logic, scene, case, fewshot_checkpoint, what, match):
    kwargs = dict(FAST)
    segmentId = case.spleen
    if what == "empty segment":
        segmentId = case.seg.GetSegmentation().AddEmptySegment("empty")
    elif what == "samples 0":
        kwargs["samples"] = 0
    elif what == "steps 51":
        kwargs["steps"] = 51
    elif what == "few-shot checkpoint as refiner":
        kwargs["refiner"] = fewshot_checkpoint
    elif what == "missing refiner":
        kwargs["refiner"] = fewshot_checkpoint.with_name("absent-refiner.pt")
    elif what == "keep slice outside":
        kwargs["keepSlices"] = [40]
    elif what == "bad axis":
        kwargs["axis"] = "oblique"
    elif what == "bad device":
        kwargs["device"] = "tpu"
    elif what == "no segment":
        segmentId = ""
    before = snapshot(case.seg, case.image)
    nodesBefore = sceneNodeIds(scene.scene)
    with pytest.raises(FewShotSegError, match=match):
        logic.refine(case.image, case.seg, segmentId, **kwargs)
    assertSameSegments(before, snapshot(case.seg, case.image))
    assert sceneNodeIds(scene.scene) == nodesBefore and not logic.isBusy


def test_refiner_given_where_a_few_shot_model_is_expected(logic, case):
    before = snapshot(case.seg, case.image)
    with pytest.raises(FewShotSegError, match="but a few-shot model or a propagator .* is needed"):
        logic.propagate(case.image, case.seg, case.spleen, model=REFINER)
    assertSameSegments(before, snapshot(case.seg, case.image))


def test_cancel_mid_run(logic, scene, case):
    from FewShotSegLib.refinement.sampling import RefineCancelled

    seen = []
    before = snapshot(case.seg, case.image)
    with pytest.raises(RefineCancelled, match="cancelled"):
        logic.refine(case.image, case.seg, case.spleen, progress=lambda f, m: seen.append(f),
                     cancel=lambda: any(f > 0.05 for f in seen), **FAST)
    assert seen
    assertSameSegments(before, snapshot(case.seg, case.image))
    assert not uncertaintyNodes(scene.scene) and not logic.isBusy


def test_segment_edited_while_refining_is_not_overwritten(logic, scene, case):
    job = logic.prepareRefine(case.image, case.seg, case.spleen, **FAST)
    edited = case.coarse.copy()
    edited[10, :10, :10] = True
    geometry.writeSegment(case.seg, case.spleen, edited, case.image)
    before = snapshot(case.seg, case.image)
    with pytest.raises(FewShotSegError, match="edited while refining"):
        logic.applyRefine(job, fakeResult(case.truth))
    assertSameSegments(before, snapshot(case.seg, case.image))
    assert not uncertaintyNodes(scene.scene)


def test_refiner_that_erases_the_segment_is_refused(logic, scene, case):
    job = logic.prepareRefine(case.image, case.seg, case.spleen, **FAST)
    before = snapshot(case.seg, case.image)
    saves = []
    with pytest.raises(FewShotSegError, match="found nothing"):
        logic.applyRefine(job, fakeResult(np.zeros_like(case.coarse)), saveStateForUndo=lambda: saves.append(1))
    assert not saves
    assertSameSegments(before, snapshot(case.seg, case.image))
    assert not uncertaintyNodes(scene.scene)


# -- in the worker process, as the Refine button runs it --------------------------------------
def writeCase(case, folder: Path) -> tuple[Path, Path]:
    """The scan and the coarse spleen as files, exactly as the Logic sees them."""
    import SimpleITK as sitk

    image = geometry.volumeToSitk(case.image)
    mask = sitk.GetImageFromArray(case.coarse.astype(np.uint8))
    mask.CopyInformation(image)
    paths = folder / "image.nii.gz", folder / "coarse.nii.gz"
    sitk.WriteImage(image, str(paths[0]))
    sitk.WriteImage(mask, str(paths[1]))
    return paths


def test_refine_under_a_gil_holding_main_loop_takes_the_command_lines_time(logic, scene, case, tmp_path):
    """The first Refine of a session (the worker starts, imports the engine, loads the
    refiner and the volume) polled by a main thread that keeps the GIL between 100 ms ticks,
    against `fewshotseg refine` on the same scan: the same segment and uncertainty, in about
    the same time (a Python thread of this interpreter ran ~20x slower under such a loop)."""
    import SimpleITK as sitk

    imagePath, maskPath = writeCase(case, tmp_path)
    out, uncertaintyPath = tmp_path / "refined.nii.gz", tmp_path / "uncertainty.nii.gz"
    command = [sys.executable, "-m", "FewShotSegLib.cli", "refine", str(imagePath), "--mask", str(maskPath),
               "-o", str(out), "--uncertainty", str(uncertaintyPath), "--samples", str(FAST["samples"]),
               "--steps", str(FAST["steps"]), "-q"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    cli = time.perf_counter() - start
    assert completed.returncode == 0, completed.stderr

    logic.shutdown()                       # no worker yet: this click starts it, like the CLI starts
    history = segmentationHistory(case.seg)
    saves = []
    start = time.perf_counter()
    job = logic.prepareRefine(case.image, case.seg, case.spleen, forWorker=True, **FAST)
    assert job.image is None               # the voxels go to the worker as they are, not copied here
    handle = logic.startRefine(job)
    mainLoop(handle, timeout=600)
    result = handle.outcome()
    summary = logic.applyRefine(job, result, saveStateForUndo=lambda: saves.append(history.SaveState()))
    waited = time.perf_counter() - start
    print(f"\nrefine: command line {cli:.2f} s; the first Refine waited {waited:.2f} s under a GIL-holding "
          f"100 ms loop (worker {result.worker_seconds:.2f} s, engine {result.seconds:.2f} s)")
    assert saves == [True] and result.worker_seconds < waited
    assert waited <= 1.3 * cli + 2 * POLL_SECONDS + 0.5   # both start Python, import the engine, load the refiner

    refined = geometry.segmentToArray(case.seg, case.spleen, case.image)
    fromCli = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0
    assert np.array_equal(refined, fromCli)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(summary.uncertaintyVolume),
                               sitk.GetArrayFromImage(sitk.ReadImage(str(uncertaintyPath))), atol=1e-5)
    assert history.RestorePreviousState()
    assert np.array_equal(geometry.segmentToArray(case.seg, case.spleen, case.image), case.coarse)


def test_cancel_in_the_worker_leaves_the_segment_and_the_worker_usable(logic, scene, case):
    from FewShotSegLib.refinement.sampling import RefineCancelled

    before = snapshot(case.seg, case.image)
    nodesBefore = sceneNodeIds(scene.scene)
    job = logic.prepareRefine(case.image, case.seg, case.spleen, forWorker=True, **CUT)
    handle = logic.startRefine(job)
    waitForProgress(handle, 0.05)
    with pytest.raises(FewShotSegError, match="already running"):   # Refine clicked twice
        logic.prepareRefine(case.image, case.seg, case.spleen, forWorker=True, **FAST)
    with pytest.raises(FewShotSegError, match="already running"):
        logic.startRefine(job)
    worker = logic.worker.worker
    handle.cancel()
    mainLoop(handle, timeout=60)
    with pytest.raises(RefineCancelled, match="refinement cancelled; the segmentation was not changed"):
        handle.outcome()
    assert handle.fraction < 1.0
    assertSameSegments(before, snapshot(case.seg, case.image))
    assert sceneNodeIds(scene.scene) == nodesBefore and not uncertaintyNodes(scene.scene)
    assert not logic.isBusy and logic.worker.worker is worker and not worker.stopped  # answered, not killed
    assert sorted(os.listdir(worker.folder)) == ["worker.log"]                     # no arrays left behind


def test_worker_killed_mid_refine(logic, scene, case):
    """One clear message, the segmentation exactly as before, no uncertainty volume, and
    the next Refine starts a fresh worker."""
    before = snapshot(case.seg, case.image)
    nodesBefore = sceneNodeIds(scene.scene)
    job = logic.prepareRefine(case.image, case.seg, case.spleen, forWorker=True, **CUT)
    worker = killMidRun(logic.startRefine(job))
    assertSameSegments(before, snapshot(case.seg, case.image))
    assert sceneNodeIds(scene.scene) == nodesBefore
    assert logic.worker.worker is None and not logic.isBusy
    summary = logic.refine(case.image, case.seg, case.spleen, worker=True, **FAST)
    assert summary.voxelsAfter > 0 and logic.worker.worker is not worker
