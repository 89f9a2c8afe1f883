"""Volume and segment <-> numpy / SimpleITK, always on the volume's own voxel grid.

Why this file exists: the engine wants arrays in SimpleITK order ``(k, j, i)`` with the
geometry in a ``SimpleITK.Image`` (LPS), while Slicer keeps geometry in the node's
IJKToRAS matrix (RAS) and may reverse the k axis of a file on load (it forces a
right-handed IJK). Deriving everything from the node itself, never from the file, keeps
painted voxels, image voxels and the written result on one grid in every orientation.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from FewShotSegLib.errors import FewShotSegError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def ijkToRasArray(volumeNode) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of the node (its own, parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def sitkGeometry(volumeNode) -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) in LPS as SimpleITK expects them."""
    m = ijkToRasArray(volumeNode)
    columns = m[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise FewShotSegError(f"volume '{volumeNode.GetName()}' has a zero voxel spacing")
    direction = RAS_TO_LPS @ (columns / spacing)
    origin = RAS_TO_LPS @ m[:3, 3]
    return tuple(float(v) for v in origin), tuple(float(v) for v in spacing), \
        tuple(float(v) for v in direction.ravel())


def checkScalarVolume(volumeNode) -> None:
    """The engine reads one 3D scalar channel; say so before anything is computed."""
    if volumeNode is None:
        raise FewShotSegError("no input volume: select the volume the segment was painted on")
    name = volumeNode.GetName()
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise FewShotSegError(f"'{name}' is not a scalar image volume ({volumeNode.GetClassName()})")
    image = volumeNode.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise FewShotSegError(f"volume '{name}' holds no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise FewShotSegError(f"volume '{name}' has {image.GetNumberOfScalarComponents()} components; "
                              "a single-channel (grayscale) volume is needed")
    sitkGeometry(volumeNode)                     # a zero voxel spacing is named before anything is read
    low, high = image.GetScalarRange()
    if low == high:
        raise FewShotSegError(f"volume '{name}' holds one value everywhere ({low:g}): nothing to propagate "
                              "along; check that it is the right volume")


def volumeToSitk(volumeNode):
    """SimpleITK image with the node's voxels and geometry (copied: safe to use off-thread)."""
    import SimpleITK as sitk

    checkScalarVolume(volumeNode)
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise FewShotSegError(f"volume '{volumeNode.GetName()}' contains NaN or infinite voxels")
    image = sitk.GetImageFromArray(array)
    origin, spacing, direction = sitkGeometry(volumeNode)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def segmentName(segmentationNode, segmentId) -> str:
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    return segment.GetName() if segment else str(segmentId)


def checkSegment(segmentationNode, segmentId) -> None:
    if segmentationNode is None:
        raise FewShotSegError("no segmentation: select the segmentation that holds the painted segment")
    if not segmentId:
        raise FewShotSegError(f"no segment selected in '{segmentationNode.GetName()}'")
    if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        raise FewShotSegError(f"segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'")


def paintedSegmentArray(segmentationNode, segmentId, volumeNode, segmentName: str,
                        outside: tuple[str, str], empty: str) -> np.ndarray:
    """The segment on the volume's grid; one with no voxel there is an error naming why:
    ``outside`` = (how it lies outside the volume, what to do) when it has voxels
    elsewhere, else ``empty`` (what to do)."""
    from FewShotSegLib.errors import FewShotSegError

    checkBinarySource(segmentationNode)
    array = segmentToArray(segmentationNode, segmentId, volumeNode)
    if not array.any():
        if segmentHasVoxels(segmentationNode, segmentId):
            raise FewShotSegError(f"segment '{segmentName}' {outside[0]} volume '{volumeNode.GetName()}': "
                                  f"{outside[1]}")
        raise FewShotSegError(f"segment '{segmentName}' is empty: {empty}")
    beyond = voxelsOutsideVolume(segmentationNode, segmentId, volumeNode)
    if beyond:
        raise FewShotSegError(f"segment '{segmentName}' has {beyond} voxels outside volume '{volumeNode.GetName()}' "
                              "(drawn on a larger volume?): the result replaces the whole segment and would "
                              "erase them; use the volume it was drawn on")
    return array


def checkBinarySource(segmentationNode) -> None:
    """A segmentation whose source representation is not the binary labelmap (made from a
    model or a surface file) keeps no result written as a labelmap: the next conversion
    from its source (saving, reloading) restores the surface. The Segment Editor asks to
    switch the source before editing; this says how."""
    segmentation = segmentationNode.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    source = (segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName")
              else segmentation.GetMasterRepresentationName())
    if source != binary:
        raise FewShotSegError(f"segmentation '{segmentationNode.GetName()}' keeps its segments as '{source}' "
                              "(made from a model or a surface): a result would not be kept; make 'Binary "
                              "labelmap' its source representation (Segmentations module, Representations) first")


def voxelsOutsideVolume(segmentationNode, segmentId, volumeNode) -> int:
    """How many of the segment's stored voxels have their centres outside the volume (more
    than half a voxel beyond its extent). Why: a result replaces the whole segment, so a
    segment drawn on a larger volume (this one cropped from it) would lose them. Corners of
    the voxels' box first; every voxel only when the box reaches outside."""
    from vtk.util import numpy_support

    image = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return 0
    extent = image.GetExtent()
    if any(high < low for low, high in zip(extent[::2], extent[1::2])):
        return 0
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    volumeToSegmentation = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode(), volumeToSegmentation):
        return 0                                   # non-linear: refused where it is written
    segmentMatrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(segmentMatrix)
    toVolume = np.linalg.inv(np.array([[volumeToSegmentation.GetElement(r, c) for c in range(4)] for r in range(4)])
                             @ ijkToRasArray(volumeNode))
    toVolume = toVolume @ np.array([[segmentMatrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    size = np.array(volumeNode.GetImageData().GetDimensions(), float)

    def outside(kji: np.ndarray) -> np.ndarray:
        ijk = np.c_[kji[:, ::-1] + np.array(extent[::2]), np.ones(len(kji))] @ toVolume.T
        return ((ijk[:, :3] < -0.5 - 1e-3) | (ijk[:, :3] > size - 0.5 + 1e-3)).any(1)

    whole = np.array([[(0, d - 1)[c] for d, c in zip(dims[::-1], bits)] for bits in np.ndindex(2, 2, 2)], float)
    if not outside(whole).any():
        return 0                                   # the usual case: its whole stored extent lies inside
    from FewShotSegLib.postprocessing import bounding_box

    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    mine = values == segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    box = bounding_box(mine)
    if box is None:
        return 0
    corners = np.array([[b.start if c == 0 else b.stop - 1 for b, c in zip(box, bits)]
                        for bits in np.ndindex(2, 2, 2)], float)
    if not outside(corners).any():
        return 0
    return int(sum(outside(np.argwhere(mine[box[0].start + k:box[0].start + k + 16, box[1], box[2]])
                           + [box[0].start + k, box[1].start, box[2].start]).sum()
                   for k in range(0, box[0].stop - box[0].start, 16)))


def volumeStamp(volumeNode) -> tuple:
    """What the result's grid depends on: the volume's IJK-to-RAS matrix, its size, its
    parent transform, and its voxels' modification time. A result computed for one stamp
    written after another lands on the wrong voxels."""
    image = volumeNode.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    toWorld = vtk.vtkMatrix4x4()
    transform = volumeNode.GetParentTransformNode()
    if transform is not None:
        transform.GetMatrixTransformToWorld(toWorld)
    return (tuple(ijkToRasArray(volumeNode).ravel()), image.GetDimensions() if image is not None else None,
            tuple(toWorld.GetElement(r, c) for r in range(4) for c in range(4)),
            scalars.GetMTime() if scalars is not None else None)


def segmentHasVoxels(segmentationNode, segmentId) -> bool:
    """Whether the segment has any voxel in its own (segmentation) geometry.

    The internal labelmap may be shared by several segments: count this segment's value.
    """
    from vtk.util import numpy_support

    image = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return False
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    return bool((values == label).any())


def _tempLabelmap(volumeNode):
    """A hidden labelmap node on the volume's grid and transform, removed by the caller."""
    scene = volumeNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__FewShotSeg_temp__")
    node.SetHideFromEditors(True)
    node.CopyOrientation(volumeNode)
    node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    return node


def _colorTableIds(scene) -> set:
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def _removeTemp(node, colorTablesBefore=None) -> None:
    """Remove the temporary node, its display node and any color table the export made."""
    scene = node.GetScene()
    if scene is None:
        return
    display = node.GetDisplayNode()
    if display is not None:
        scene.RemoveNode(display)
    scene.RemoveNode(node)
    if colorTablesBefore is not None:
        for nodeId in _colorTableIds(scene) - colorTablesBefore:
            scene.RemoveNode(scene.GetNodeByID(nodeId))


def segmentToArray(segmentationNode, segmentId, volumeNode, box: tuple | None = None) -> np.ndarray:
    """The segment as a bool array on the volume's grid (resampled if the geometries differ);
    ``box`` (slices, array order): only that part (read alone when the segment is on the grid)."""
    direct = _segmentOnGridArray(segmentationNode, segmentId, volumeNode, box)
    if direct is not None:
        return direct
    whole = _exportedSegmentArray(segmentationNode, segmentId, volumeNode)
    return whole if box is None else whole[box].copy()


def _exportedSegmentArray(segmentationNode, segmentId, volumeNode) -> np.ndarray:
    """The segment exported onto the volume's grid by Slicer (resampled where needed)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    colorTablesBefore = _colorTableIds(volumeNode.GetScene())
    labelmap = _tempLabelmap(volumeNode)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmap, volumeNode)
        if not ok:
            raise FewShotSegError(f"could not export segment '{segmentName(segmentationNode, segmentId)}' "
                                  f"onto the grid of volume '{volumeNode.GetName()}'")
        array = slicer.util.arrayFromVolume(labelmap) > 0
        expected = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
        if array.shape != expected:  # never seen: the reference volume fixes the extent
            raise FewShotSegError(f"segment export gave shape {array.shape}, volume is {expected}")
        return array.copy()
    finally:
        _removeTemp(labelmap, colorTablesBefore)


def _segmentOnGridArray(segmentationNode, segmentId, volumeNode, box: tuple | None = None) -> np.ndarray | None:
    """The segment's stored voxels copied onto the volume's grid, when they lie on it (the
    usual case: a segmentation made on this volume), else None. Why: Slicer's export writes
    and reads back the whole volume through a temporary node (a third of a second on a
    512x512x300 CT); the stored labelmap covers only the segment's own extent."""
    from vtk.util import numpy_support

    segmentation = segmentationNode.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    source = (segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName")
              else segmentation.GetMasterRepresentationName())
    image = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    offset = segmentVoxelOffset(segmentationNode, segmentId, volumeNode) if image is not None else None
    if source != binary or offset is None:
        return None
    shape = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
    box = box or tuple(slice(0, n) for n in shape)
    out = np.zeros(tuple(b.stop - b.start for b in box), bool)
    extent = image.GetExtent()
    if any(high < low for low, high in zip(extent[::2], extent[1::2])) or image.GetPointData().GetScalars() is None:
        return out                                  # an empty segment
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    label = segmentation.GetSegment(segmentId).GetLabelValue()
    # volume index of the stored voxel (0, 0, 0) of the extent, per axis (i, j, k) -> array (k, j, i)
    starts = [int(offset[a] + extent[2 * a]) for a in range(3)]
    src, dst = [], []
    for a in (2, 1, 0):
        part = box[2 - a]
        low, high = max(part.start, starts[a]), min(part.stop, starts[a] + dims[a])
        if high <= low:
            return out                              # the segment lies outside the volume (or the box)
        src.append(slice(low - starts[a], high - starts[a]))
        dst.append(slice(low - part.start, high - part.start))
    out[tuple(dst)] = values[tuple(src)] == label
    return out


def arrayToOrientedImage(mask: np.ndarray, volumeNode, segmentationNode=None, crop: bool = False):
    """A uint8 vtkOrientedImageData on the volume's grid, in the segmentation's coordinates
    (what modifySelectedSegmentByLabelmap expects); parent transforms are accounted for.

    ``crop``: only the box holding the mask's voxels (its extent says where). Replacing a
    segment (Slicer's MODE_REPLACE, the editor's Set mode) clears it outside the modifier's
    extent too, so the box writes the same segment, without passes over the whole volume
    (a third of a second on a 512x512x300 CT). Not when the editor masks the write (see
    ``editorMasks``)."""
    start = (0, 0, 0)
    if crop:
        from FewShotSegLib.postprocessing import bounding_box

        box = bounding_box(np.asarray(mask, bool)) or (slice(0, 1),) * 3   # a modifier cannot be empty
        start = tuple(b.start for b in box)
        mask = mask[box]
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(start[2], start[2] + mask.shape[2] - 1, start[1], start[1] + mask.shape[1] - 1,
                    start[0], start[0] + mask.shape[0] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    from vtk.util import numpy_support

    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(mask.shape)
    target[:] = mask
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    volumeToSegmentation = vtk.vtkMatrix4x4()
    segmentationTransform = segmentationNode.GetParentTransformNode() if segmentationNode else None
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volumeNode.GetParentTransformNode(), segmentationTransform, volumeToSegmentation):
        raise FewShotSegError(f"volume '{volumeNode.GetName()}' or its segmentation is under a "
                              "non-linear transform; harden the transform first")
    vtk.vtkMatrix4x4.Multiply4x4(volumeToSegmentation, matrix, matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def orientedImageToArray(image, volumeNode, segmentationNode) -> np.ndarray:
    """A labelmap in the segmentation's coordinates (the editor's mask) as a bool array on
    the volume's grid: resampled (nearest voxel) onto `arrayToOrientedImage`'s grid."""
    from vtk.util import numpy_support

    shape = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
    reference = arrayToOrientedImage(np.zeros(shape, np.uint8), volumeNode, segmentationNode)
    resampled = _resampled(image, reference, f"could not resample the editor's mask onto volume "
                                             f"'{volumeNode.GetName()}'")
    return numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape) > 0


def _resampled(image, reference, failure: str):
    """``image`` resampled (nearest voxel) onto ``reference``'s grid and extent; ``failure``
    is the error's message."""
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, resampled, False):
        raise FewShotSegError(failure)
    return resampled


def onReferenceGrid(modifier, reference):
    """``modifier`` resampled (nearest voxel) onto the grid of ``reference`` (the Segment
    Editor's reference geometry image), or itself when it already lies on it or there is
    no reference. Why: with the editor's intensity range on, Slicer writes a modifier only
    when its geometry matches the source volume aligned to that grid, and ours lies on the
    volume's own grid (a segmentation oversampled, or made for another volume, differs)."""
    if reference is None or any(high < low for low, high in zip(reference.GetExtent()[::2], reference.GetExtent()[1::2])):
        return modifier      # the editor has no reference grid yet
    if slicer.vtkOrientedImageDataResample.DoGeometriesMatch(modifier, reference):   # Slicer's own test
        return modifier
    return _resampled(modifier, reference, "could not resample the result onto the segmentation's grid; "
                                           "nothing was written")


def editorMasks(editorNode) -> bool:
    """Whether the Segment Editor's settings mask what a write changes (an editable area other
    than everywhere, or the source intensity range). Why: then Slicer's Set mode keeps the
    segment's voxels outside the editable area only inside the modifier's extent, so a
    cropped modifier would erase those outside its box; such a write takes the whole grid."""
    if editorNode is None:
        return False
    return (editorNode.GetMaskMode() != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
            or bool(editorNode.GetSourceVolumeIntensityMask()))


def writeSegment(segmentationNode, segmentId, mask: np.ndarray, volumeNode) -> None:
    """Replace one segment's content by ``mask`` (volume grid); other segments are not touched.

    Goes through vtkOrientedImageData + SetBinaryLabelmapToSegment (what editor effects
    use) rather than a temporary labelmap node: with a transformed volume, importing a
    transformed labelmap node into an empty segmentation applies the transform twice.
    """
    image = arrayToOrientedImage(mask, volumeNode, segmentationNode, crop=True)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
        raise FewShotSegError(f"could not write the result into segment "
                              f"'{segmentName(segmentationNode, segmentId)}'")


def segmentVoxelOffset(segmentationNode, segmentId, volumeNode):
    """(i, j, k) whole voxels from the volume's grid to the segment's stored labelmap when
    they share axes and spacing and differ by whole voxels, else None (or (0, 0, 0) when
    nothing is stored)."""
    image = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if image is None:
        return np.zeros(3, int)
    segmentMatrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(segmentMatrix)
    volumeToSegmentation = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode(), volumeToSegmentation):
        return None
    volumeMatrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(volumeMatrix)
    vtk.vtkMatrix4x4.Multiply4x4(volumeToSegmentation, volumeMatrix, volumeMatrix)
    seg = np.array([[segmentMatrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    vol = np.array([[volumeMatrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    if not np.allclose(seg[:3, :3], vol[:3, :3], atol=1e-4):
        return None
    offset = np.linalg.solve(vol[:3, :3], seg[:3, 3] - vol[:3, 3])  # in volume voxels
    return np.round(offset).astype(int) if np.allclose(offset, np.round(offset), atol=1e-3) else None


def segmentOnVolumeGrid(segmentationNode, segmentId, volumeNode) -> bool:
    """Whether the segment's stored labelmap shares the volume's voxel grid (same axes and
    spacing, whole-voxel offset); otherwise reading it onto the volume resamples it."""
    return segmentVoxelOffset(segmentationNode, segmentId, volumeNode) is not None


AXIS_NAMES = ("axial", "coronal", "sagittal")


def directionImage(volumeNode):
    """A 1-voxel SimpleITK image with the volume's direction: enough for the anatomical
    axis names (FewShotSegLib.imageio.array_axis_for) without copying the voxels."""
    import SimpleITK as sitk

    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    origin, spacing, direction = sitkGeometry(volumeNode)
    image.SetDirection(direction)
    return image


def axisName(image, axisIndex: int) -> str:
    """The anatomical name of a numpy axis of the volume array."""
    from FewShotSegLib.imageio import array_axis_for

    for name in AXIS_NAMES:
        if int(array_axis_for(image, name)) == int(axisIndex):
            return name
    return AXIS_NAMES[0]


def workerVolume(volumeNode, image=None) -> tuple:
    """What the worker process needs of a volume: (voxels, {"origin", "spacing", "direction"},
    key). The voxels are ``image``'s when the job copied them, else the node's (no copy);
    the key changes when the voxels or the grid do, so the worker is sent a volume only when
    it does not hold it."""
    from FewShotSegSlicerLib.userslices import gridFingerprint

    if image is not None:
        import SimpleITK as sitk

        array = sitk.GetArrayViewFromImage(image)
    else:
        array = slicer.util.arrayFromVolume(volumeNode)
    origin, spacing, direction = sitkGeometry(volumeNode)
    key = f"{volumeNode.GetID()}:{volumeNode.GetImageData().GetMTime()}:{gridFingerprint(volumeNode)}"
    return array, {"origin": origin, "spacing": spacing, "direction": direction}, key


def checkFinite(volumeNode) -> None:
    """NaN or infinite voxels are refused before anything is computed (no copy made)."""
    array = slicer.util.arrayFromVolume(volumeNode)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise FewShotSegError(f"volume '{volumeNode.GetName()}' contains NaN or infinite voxels")


def slicePosition(volumeNode, axisIndex: int, sliceIndex: int, mask: "np.ndarray | None" = None) -> tuple:
    """World (RAS) point on slice ``sliceIndex`` along array axis ``axisIndex``: the centre
    of ``mask`` on that slice when it has voxels there, else the slice's centre."""
    dims = volumeNode.GetImageData().GetDimensions()
    point = [(n - 1) / 2.0 for n in reversed(dims)]  # array order k, j, i
    if mask is not None:
        plane = np.moveaxis(np.asarray(mask, bool), axisIndex, 0)[int(sliceIndex)]
        if plane.any():
            others = [a for a in range(3) if a != axisIndex]
            centre = np.argwhere(plane).mean(0)
            point[others[0]], point[others[1]] = float(centre[0]), float(centre[1])
    point[axisIndex] = float(sliceIndex)
    k, j, i = point
    ras = ijkToRasArray(volumeNode) @ np.array([i, j, k, 1.0])
    toWorld = vtk.vtkMatrix4x4()
    if slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(volumeNode.GetParentTransformNode(), None, toWorld):
        ras = np.array(toWorld.MultiplyPoint(tuple(ras)))
    return tuple(float(v) for v in ras[:3])


def segmentStamp(segmentationNode, segmentId):
    """(labelmap object, its modification time): equal stamps mean the segment's voxels were
    not changed (any edit modifies or replaces the labelmap). None when it has none."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
    if segment is None:
        return None
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    labelmap = segment.GetRepresentation(name)
    return None if labelmap is None else (labelmap.GetAddressAsString(""), labelmap.GetMTime())
