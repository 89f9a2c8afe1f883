"""Reading a segment onto the volume's grid (FewShotSeg/FewShotSegSlicerLib/geometry.py) on real
MRML (PyPI slicer-core): the direct copy of the stored voxels, used when they lie on the
volume's grid, must give exactly what Slicer's own export gives. Needs ../shared/data."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "FewShotSeg"), str(ROOT)]

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from FewShotSegSlicerLib import geometry  # noqa: E402
from FewShotSegSlicerLib.headless import segmentIds  # noqa: E402
from test_slicer_logic import coarseSegmentation, data_dir, sharedCore  # noqa: E402,F401  (one SlicerCore per process)


@pytest.fixture
def scene(data_dir):
    core = sharedCore()
    core.scene.Clear(0)
    yield core
    core.scene.Clear(0)


def _shifted_reference(scene, volume, voxels: tuple):
    """A volume node on the same axes and spacing, its origin moved by whole voxels (i, j, k)
    and its grid larger: a segmentation made on it stores voxels offset from the volume's."""
    import vtk
    node = scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "shifted")
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    shift = [sum(matrix.GetElement(r, c) * voxels[c] for c in range(3)) for r in range(3)]
    for r in range(3):
        matrix.SetElement(r, 3, matrix.GetElement(r, 3) + shift[r])
    node.SetIJKToRASMatrix(matrix)
    image = vtk.vtkImageData()
    dims = volume.GetImageData().GetDimensions()
    image.SetDimensions(dims[0] + 7, dims[1] + 5, dims[2] + 3)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(image)
    return node


def test_the_direct_copy_equals_slicers_export(scene, data_dir):
    volume = scene.load(data_dir / "chaos_t2" / "image_15.nii.gz")
    labels = scene.load(data_dir / "chaos_t2" / "label_15.nii.gz", labelmap=True)
    same = scene.segmentation(volume, "same grid")
    scene.importLabels(labels, same)                     # four organs sharing one labelmap
    shifted = scene.segmentation(_shifted_reference(scene, volume, (-4, 3, -2)), "shifted grid")
    scene.importLabels(labels, shifted)
    checked = 0
    for segmentation in (same, shifted):
        for sid in segmentIds(segmentation):
            direct = geometry._segmentOnGridArray(segmentation, sid, volume)
            assert direct is not None, "the stored voxels lie on the volume's grid: no export needed"
            exported = geometry._exportedSegmentArray(segmentation, sid, volume)
            assert exported.any() and np.array_equal(direct, exported), (segmentation.GetName(), sid)
            # a box of it alone (the effect reads other segments only where a result lies)
            box = (slice(5, 20), slice(60, 180), slice(100, 256))
            assert np.array_equal(geometry.segmentToArray(segmentation, sid, volume, box), exported[box])
            checked += 1
    assert checked == 8


def test_a_segmentation_on_another_grid_is_exported(scene, data_dir):
    """Stored twice as coarse in-plane: the direct copy declines and Slicer resamples."""
    volume = scene.load(data_dir / "chaos_t2" / "image_15.nii.gz")
    labels = slicer.util.arrayFromVolume(scene.load(data_dir / "chaos_t2" / "label_15.nii.gz", labelmap=True))
    segmentation, ids = coarseSegmentation(scene, volume, labels[:, ::2, ::2])
    liver = ids[1]
    assert not geometry.segmentOnVolumeGrid(segmentation, liver, volume)
    assert geometry._segmentOnGridArray(segmentation, liver, volume) is None
    array = geometry.segmentToArray(segmentation, liver, volume)
    box = (slice(2, 9), slice(10, 200), slice(0, 128))
    assert np.array_equal(geometry.segmentToArray(segmentation, liver, volume, box), array[box])
    truth = labels == 1
    assert array.shape == truth.shape and 2 * (array & truth).sum() / (array.sum() + truth.sum()) > 0.9


@pytest.mark.parametrize("path", ["segmentations logic", "segment editor logic"])
def test_a_cropped_write_replaces_the_whole_segment(scene, data_dir, path):
    """The result is written as the box of its voxels: what the segment held outside that
    box is gone too, and the other segments keep theirs (both ways a segment is written)."""
    volume = scene.load(data_dir / "chaos_t2" / "image_15.nii.gz")
    labels = scene.load(data_dir / "chaos_t2" / "label_15.nii.gz", labelmap=True)
    segmentation = scene.segmentation(volume)
    ids = scene.importLabels(labels, segmentation)
    before = {sid: geometry.segmentToArray(segmentation, sid, volume) for sid in ids.values()}
    liver = ids[1]
    small = np.zeros_like(before[liver])
    small[10:12, 100:120, 90:110] = True                  # far smaller than the liver held
    for mask in (small, np.zeros_like(small)):           # then an empty result
        if path == "segmentations logic":
            geometry.writeSegment(segmentation, liver, mask, volume)
        else:
            if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
                pytest.skip("this Slicer has no C++ segment editor logic (before 5.9)")
            editor = scene.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
            logic = slicer.vtkSlicerSegmentEditorLogic()
            logic.SetMRMLScene(scene.scene)
            logic.SetSegmentEditorNode(editor)
            editor.SetAndObserveSegmentationNode(segmentation)
            editor.SetAndObserveSourceVolumeNode(volume)
            modifier = geometry.arrayToOrientedImage(mask, volume, segmentation, crop=True)
            logic.ModifySegmentByLabelmap(segmentation, liver, modifier, logic.ModificationModeSet, True, False)
        assert np.array_equal(geometry.segmentToArray(segmentation, liver, volume), mask)
        assert np.array_equal(geometry._exportedSegmentArray(segmentation, liver, volume), mask)
        for sid in ids.values():
            if sid != liver:
                assert np.array_equal(geometry.segmentToArray(segmentation, sid, volume), before[sid])


@pytest.mark.parametrize("masking", ["intensity range", "editable area"])
def test_a_masked_write_keeps_the_voxels_outside_the_editable_area(scene, data_dir, masking):
    """With the editor masking the write, Set mode keeps the segment's voxels outside the
    editable area only inside the modifier's extent: the Logic then writes the whole grid
    (a box would erase the protected voxels outside it; checked on Slicer's own logic)."""
    from types import SimpleNamespace

    from FewShotSegSlicerLib.logic import FewShotSegLogic

    if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
        pytest.skip("this Slicer has no C++ segment editor logic (before 5.9)")
    volume = scene.load(data_dir / "chaos_t2" / "image_15.nii.gz")
    labels = scene.load(data_dir / "chaos_t2" / "label_15.nii.gz", labelmap=True)
    segmentation = scene.segmentation(volume)
    ids = scene.importLabels(labels, segmentation)
    liver, spleen = ids[1], ids[4]
    before = geometry.segmentToArray(segmentation, liver, volume)
    image = slicer.util.arrayFromVolume(volume)
    editor = scene.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    if masking == "intensity range":
        low = float(np.percentile(image[before], 30))
        editor.SetSourceVolumeIntensityMask(True)
        editor.SetSourceVolumeIntensityMaskRange(low, 1e5)
        protected = before & (image < low)
    else:   # editable only inside the spleen's segment: the liver's voxels are all outside it
        editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
        editor.SetMaskSegmentID(spleen)
        protected = before
    assert geometry.editorMasks(editor) and protected.sum() > 1000
    result = np.zeros_like(before)
    result[10:12, 100:120, 90:110] = True                 # a small result far from most of the liver
    job = SimpleNamespace(volumeNode=volume, segmentationNode=segmentation, segmentId=liver)
    FewShotSegLogic(workerPython="unused").writeMask(job, result, editorNode=editor)
    after = geometry.segmentToArray(segmentation, liver, volume)
    assert np.array_equal(after & protected, protected), "voxels outside the editable area were erased"
    editor.SetSourceVolumeIntensityMask(False)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    assert not geometry.editorMasks(editor) and not geometry.editorMasks(None)
