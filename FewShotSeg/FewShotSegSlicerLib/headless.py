"""3D Slicer's MRML scene and module logics without the desktop application.

PyPI's ``slicer-core`` ships Slicer's MRML and module logic libraries without Qt. This
sets them up the way Kitware's trame-slicer SlicerApp does (REFERENCE §6), so the Logic
can run on real volume and segmentation nodes in tests, benchmarks and headless scripts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk


class SlicerCore:
    """One scene with the Colors, Volumes and Segmentations logics attached.

    Create one per process: the segmentations logic registers the labelmap / closed
    surface converter rules globally.
    """

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.app.GetColorLogic().SetMRMLScene(self.scene)
        self.app.GetColorLogic().AddDefaultColorNodes()
        self.app.SetSliceLogics(vtk.vtkCollection())
        self.app.SetViewLogics(vtk.vtkCollection())
        self.colors = slicer.vtkMRMLColorLogic()
        self.colors.SetMRMLApplicationLogic(self.app)
        self.colors.SetMRMLScene(self.scene)
        self.app.SetModuleLogic("Colors", self.colors)
        self.volumes = slicer.vtkSlicerVolumesLogic()
        self.volumes.SetMRMLScene(self.scene)
        self.volumes.SetMRMLApplicationLogic(self.app)
        self.app.SetModuleLogic("Volumes", self.volumes)
        self.segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations.SetMRMLScene(self.scene)
        self.segmentations.SetMRMLApplicationLogic(self.app)
        self.app.SetModuleLogic("Segmentations", self.segmentations)

    def load(self, path, labelmap: bool = False, files=()):
        """Load a volume file (or a DICOM series given as ``files``) as Slicer does."""
        names = vtk.vtkStringArray()
        for f in files:
            names.InsertNextValue(str(f))
        node = self.volumes.AddArchetypeVolume(str(path), Path(path).name, 1 if labelmap else 0, names)
        if node is None:
            raise RuntimeError(f"Slicer could not load {path}")
        return node

    def segmentation(self, reference, name="Segmentation"):
        """An empty segmentation node whose geometry follows ``reference``."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        return node

    def importLabels(self, labelNode, segmentation) -> dict:
        """Slicer's own label import: label value -> new segment id."""
        before = set(segmentIds(segmentation))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentation):
            raise RuntimeError("Slicer could not import the labelmap into the segmentation")
        new = [s for s in segmentIds(segmentation) if s not in before]
        values = [int(v) for v in np.unique(slicer.util.arrayFromVolume(labelNode)) if v]
        return dict(zip(values, new))


def segmentIds(segmentation) -> list[str]:
    s = segmentation.GetSegmentation()
    return [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]
