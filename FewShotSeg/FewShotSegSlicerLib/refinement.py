"""Refine a segment with the diffusion refiner: what the three steps hand each other, the
uncertainty volume, and the slices to review first. No Qt.

Why a file of its own: refinement follows propagation's prepare / compute / apply split
(FewShotSegLogic), but adds MRML output besides the segment -- a scalar volume holding the
per-voxel uncertainty on the image's grid, coloured so that it can be laid over the image
-- and a ranking of slices by uncertainty with world positions, so that the widget (or
the console) can jump the slice views to where the refiner was least sure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import vtk

UNCERTAINTY_ATTRIBUTE = "FewShotSeg.UncertaintyOf"   # "<segmentation node id>/<segment id>"
# First one present wins: Slicer's perceptual colour files, then tables every scene has.
COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
                  "vtkMRMLColorTableNodeIron", "vtkMRMLColorTableNodeRainbow")
TOP_SLICES = 10
AXIS_LETTERS = {"axial": "S", "coronal": "A", "sagittal": "R"}


@dataclass
class RefineJob:
    """Everything the worker needs, copied out of MRML on the main thread."""

    volumeNode: object
    segmentationNode: object
    segmentId: str
    segmentName: str
    image: object                 # SimpleITK.Image on the volume's grid (None for the worker)
    coarse: np.ndarray            # bool, volume array order: the segment as it is now
    keep: Optional[np.ndarray]    # bool or None: slices kept exactly (the painted ones)
    refinerPath: Path
    samples: int
    steps: int
    axis: str                     # anatomical name
    axisIndex: int                # numpy axis of the volume array
    device: str
    keptSlices: list = field(default_factory=list)
    prepareSeconds: float = 0.0
    notes: list = field(default_factory=list)
    volumeStamp: Optional[tuple] = None    # geometry.volumeStamp at prepare

    @property
    def support(self) -> np.ndarray:
        """The segment's voxels when the job was made (what checkUnchanged compares with)."""
        return self.coarse


@dataclass
class UncertainSlice:
    index: int                    # slice index along the refinement axis (volume array order)
    score: float                  # summed uncertainty of the slice
    position: tuple               # world RAS: uncertainty-weighted centre, on the slice plane
    axis: str = "axial"

    @property
    def label(self) -> str:
        letter = AXIS_LETTERS.get(self.axis, "")
        coordinate = {"R": 0, "A": 1, "S": 2}.get(letter)
        where = f" ({letter} {self.position[coordinate]:.1f} mm)" if coordinate is not None else ""
        return f"{self.axis.capitalize()} slice {self.index}{where}: uncertainty {self.score:.1f}"


@dataclass
class RefineSummary:
    slicesRefined: int
    voxelsBefore: int
    voxelsAfter: int
    voxelsChanged: int
    keptSlices: int
    seconds: float                # prepare + compute + apply, as the user waits
    engineSeconds: float          # FewShotSegLib.refinement.refine() alone
    networkSeconds: float
    samples: int
    steps: int
    axis: str
    device: str
    refiner: str
    uncertaintyVolume: object = None
    topSlices: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def statusText(self) -> str:
        text = (f"Refined {self.slicesRefined} {self.axis} slices (K={self.samples}, {self.steps} steps, "
                f"{self.device}) in {self.seconds:.1f} s: {self.voxelsChanged} voxels changed")
        if self.keptSlices:
            text += f", {self.keptSlices} painted slice(s) kept"
        if self.topSlices:
            text += "; most uncertain slices: " + ", ".join(str(s.index) for s in self.topSlices[:3])
        return text + "".join(f". {note}" for note in self.notes)


def worldPosition(volumeNode, ijk) -> tuple:
    """RAS world coordinates of a (possibly fractional) IJK point of the volume."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    point = matrix.MultiplyPoint((float(ijk[0]), float(ijk[1]), float(ijk[2]), 1.0))[:3]
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        toWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformToWorld(toWorld)
        point = toWorld.TransformPoint(point)
    return tuple(float(v) for v in point)


def rankSlices(uncertainty: np.ndarray, axisIndex: int, volumeNode, axis: str = "axial",
               count: int = TOP_SLICES) -> list[UncertainSlice]:
    """The ``count`` slices with the largest summed uncertainty (most first; slices with none
    are left out), each with the world position of its uncertainty-weighted centre."""
    moved = np.moveaxis(np.asarray(uncertainty, np.float64), axisIndex, 0)
    scores = moved.reshape(moved.shape[0], -1).sum(1)
    order = [int(i) for i in np.argsort(-scores, kind="stable")[:max(0, int(count))] if scores[i] > 0]
    out = []
    for index in order:
        weights = moved[index]
        centre = [float((grid * weights).sum() / scores[index]) for grid in np.indices(weights.shape)]
        kji = centre[:axisIndex] + [float(index)] + centre[axisIndex:]   # back to volume array order
        out.append(UncertainSlice(index, float(scores[index]), worldPosition(volumeNode, kji[::-1]), axis))
    return out


def findUncertaintyVolume(segmentationNode, segmentId):
    """The uncertainty volume made earlier for this segment, or None."""
    scene = segmentationNode.GetScene()
    key = f"{segmentationNode.GetID()}/{segmentId}"
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(UNCERTAINTY_ATTRIBUTE) == key:
            return node
    return None


def colorNodeId(scene) -> Optional[str]:
    for nodeId in COLOR_NODE_IDS:
        if scene.GetNodeByID(nodeId) is not None:
            return nodeId
    return None


def updateUncertaintyVolume(job: RefineJob, uncertainty: np.ndarray):
    """Create or update "<segment> uncertainty": the image's grid and transform, a colour
    table, zero shown transparent; which views show it is the widget's business."""
    scene = job.volumeNode.GetScene()
    node = findUncertaintyVolume(job.segmentationNode, job.segmentId)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{job.segmentName} uncertainty"))
        node.SetAttribute(UNCERTAINTY_ATTRIBUTE, f"{job.segmentationNode.GetID()}/{job.segmentId}")
    node.CopyOrientation(job.volumeNode)
    node.SetAndObserveTransformNodeID(job.volumeNode.GetTransformNodeID())
    values = np.ascontiguousarray(uncertainty, dtype=np.float32)
    slicer.util.updateVolumeFromArray(node, values)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    colorId = colorNodeId(scene)
    if colorId:
        display.SetAndObserveColorNodeID(colorId)
    positive = values[values > 0]
    high = float(np.percentile(positive, 99.5)) if positive.size else 1.0
    high = max(high, 1e-6)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, high)
    display.AutoThresholdOff()
    display.SetThreshold(0.02 * high, max(float(values.max()), high) + 1.0)  # below: transparent
    display.SetApplyThreshold(1)
    return node
