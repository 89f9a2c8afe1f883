"""Every painted segment propagated in one click, on real MRML (PyPI slicer-core) and a
real CHAOS-T2 scan: the Logic gives the engine's several-structure result, one undo state,
segments disjoint and every drawn slice kept; bad input and edits made meanwhile leave
every segment as it was. Needs ../shared/data; skips without."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "FewShotSeg"), str(ROOT), str(Path(__file__).resolve().parent)]

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
pytest.importorskip("torch")

from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegSlicerLib import geometry  # noqa: E402
from FewShotSegSlicerLib.logic import FewShotSegLogic  # noqa: E402
from test_slicer_logic import (assertSameSegments, core, data_dir, dice, loadChaosCase,  # noqa: E402,F401
                               private_model_home, scene, snapshot)

CASE = "20"            # a development case: there the spleen's walk runs onto the left kidney
ORGANS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}


@pytest.fixture(scope="module")
def logic():
    logic = FewShotSegLogic()
    yield logic
    logic.shutdown()


@pytest.fixture
def organs(scene, data_dir):
    """Four segments, each organ drawn on its own largest slice, and an empty fifth."""
    image, labelNode, label = loadChaosCase(scene, data_dir, CASE)
    painted = np.zeros_like(label)
    slices = {}
    for value in ORGANS:
        k = int(np.argmax((label == value).sum((1, 2))))
        painted[k][label[k] == value] = value
        slices[value] = k
    slicer.util.updateVolumeFromArray(labelNode, painted)
    seg = scene.segmentation(image)
    ids = scene.importLabels(labelNode, seg)
    scene.scene.RemoveNode(labelNode)
    seg.GetSegmentation().AddEmptySegment("empty", "empty")
    return SimpleNamespace(image=image, seg=seg, ids=ids, label=label, painted=painted, slices=slices)


@pytest.mark.parametrize("worker", [False, True], ids=["in process", "worker process"])
def test_all_painted_segments_in_one_click(logic, organs, worker):
    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.structures import propagate_structures

    undo, messages = [], []
    summary = logic.propagateSegments(organs.image, organs.seg, saveStateForUndo=lambda: undo.append(1),
                                      worker=worker, progress=lambda fraction, message: messages.append(message))
    assert undo == [1] and set(summary.summaries) == set(organs.ids.values())   # the empty one left out
    results = {value: geometry.segmentToArray(organs.seg, sid, organs.image) for value, sid in organs.ids.items()}
    assert not geometry.segmentToArray(organs.seg, "empty", organs.image).any()
    total = np.sum([r.astype(np.uint8) for r in results.values()], axis=0)
    assert total.max() == 1, "two segments hold the same voxel"
    for value, k in organs.slices.items():
        assert np.array_equal(results[value][k], organs.painted[k] == value), ORGANS[value]
    engine = propagate_structures(geometry.volumeToSitk(organs.image), organs.painted, load_for_mode(None, "auto"))
    for value in ORGANS:
        assert np.array_equal(results[value], engine.labels == value), f"{ORGANS[value]} differs from the engine's"
    assert np.mean([dice(results[v], organs.label == v) for v in ORGANS]) > 0.8
    assert "Filled 4 segments" in summary.statusText()
    spleenName = organs.seg.GetSegmentation().GetSegment(organs.ids[4]).GetName()
    assert any(m.startswith(f"{spleenName}: ") for m in messages), messages[-5:]   # progress names the segment
    labels = [look.label for look in summary.suggestions]
    assert labels and labels == [look.label for look in summary.suggestions]   # named once, by segment
    names = {organs.seg.GetSegmentation().GetSegment(sid).GetName() for sid in organs.ids.values()}
    assert all(label.split(": ")[0] in names and label.split(": ")[1] not in names for label in labels)
    for look in summary.suggestions:        # each names the segment to correct there
        assert organs.seg.GetSegmentation().GetSegment(look.segmentId).GetName() == look.label.split(": ")[0]


def test_a_correction_keeps_every_segments_drawn_slices(logic, organs):
    logic.propagateSegments(organs.image, organs.seg)
    spleen = organs.ids[4]
    k = organs.slices[4] - 3                           # the user corrects one spleen slice
    current = geometry.segmentToArray(organs.seg, spleen, organs.image)
    current[k] = organs.label[k] == 4
    geometry.writeSegment(organs.seg, spleen, current, organs.image)
    logic.propagateSegments(organs.image, organs.seg)
    after = {value: geometry.segmentToArray(organs.seg, sid, organs.image) for value, sid in organs.ids.items()}
    assert np.array_equal(after[4][k], organs.label[k] == 4)
    for value, painted in organs.slices.items():
        assert np.array_equal(after[value][painted], organs.painted[painted] == value), ORGANS[value]


def test_two_segments_drawn_on_the_same_voxels_are_refused(logic, organs):
    liver, kidney = organs.ids[1], organs.ids[2]
    k = organs.slices[1]
    overlap = geometry.segmentToArray(organs.seg, kidney, organs.image)
    overlap[k] |= organs.painted[k] == 1                 # the kidney segment also holds the liver's slice
    geometry.writeSegment(organs.seg, kidney, overlap, organs.image)
    before = snapshot(organs.seg, organs.image)
    with pytest.raises(FewShotSegError, match="both drawn on the same voxels") as error:
        logic.propagateSegments(organs.image, organs.seg)
    assert "\n" not in str(error.value)
    assertSameSegments(before, snapshot(organs.seg, organs.image))


def test_a_segment_that_cannot_be_propagated_is_named(logic, organs):
    """An axis that disagrees with the painting: one line naming the first segment it fails on."""
    name = organs.seg.GetSegmentation().GetSegment(organs.ids[1]).GetName()
    before = snapshot(organs.seg, organs.image)
    with pytest.raises(FewShotSegError) as error:
        logic.propagateSegments(organs.image, organs.seg, axis="coronal")
    assert name in str(error.value) and "\n" not in str(error.value), str(error.value)
    assertSameSegments(before, snapshot(organs.seg, organs.image))


def test_a_segment_edited_while_running_leaves_every_segment(logic, organs):
    job = logic.prepareSegments(organs.image, organs.seg, forWorker=False)
    results = logic.computeSegments(job)
    kidney = organs.ids[3]
    edited = geometry.segmentToArray(organs.seg, kidney, organs.image)
    edited[0, :4, :4] = True                             # the user paints meanwhile
    geometry.writeSegment(organs.seg, kidney, edited, organs.image)
    before = snapshot(organs.seg, organs.image)
    with pytest.raises(FewShotSegError, match="edited while propagating"):
        logic.applySegments(job, results)
    assertSameSegments(before, snapshot(organs.seg, organs.image))


def test_no_painted_segment_is_one_clear_error(logic, scene, data_dir):
    image = scene.load(data_dir / "chaos_t2" / f"image_{CASE}.nii.gz")
    seg = scene.segmentation(image)
    seg.GetSegmentation().AddEmptySegment("empty", "empty")
    with pytest.raises(FewShotSegError, match="no segment of"):
        logic.propagateSegments(image, seg)


@pytest.mark.skipif(not hasattr(slicer, "vtkSlicerSegmentEditorLogic"),
                    reason="this Slicer has no C++ segment editor logic (before 5.9)")
def test_all_segments_through_the_editors_intensity_range(logic, scene, organs):
    """The effect's path with masking on: each segment's walks stay inside the range and
    each write goes through Slicer's editor logic (Set mode, whole grid), so no segment
    holds a voxel outside the range beyond what was drawn."""
    values = slicer.util.arrayFromVolume(organs.image)
    low = float(np.percentile(values[organs.label > 0], 5))
    editor = scene.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(low, float(values.max()))
    undo = []
    summary = logic.propagateSegments(organs.image, organs.seg, editorNode=editor,
                                      saveStateForUndo=lambda: undo.append(1))
    assert undo == [1] and len(summary.summaries) == 4
    for value, sid in organs.ids.items():
        result = geometry.segmentToArray(organs.seg, sid, organs.image)
        drawn = organs.painted == value
        assert not (result & ~drawn & (values < low)).any(), ORGANS[value]
        assert dice(result, organs.label == value) > 0.6, ORGANS[value]
