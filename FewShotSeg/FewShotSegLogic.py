"""FewShotSeg logic: painted segment in, propagated segment out, no GUI.

Why a separate file: the module widget, the Segment Editor effect, the Python console and
the tests on PyPI's slicer-core all drive the same code, and none of them but the widget
may need Qt. The work is split in three steps so that only the middle one (seconds to
minutes, no MRML access) runs on a worker thread:

    job = logic.prepare(volume, segmentation, segmentId, model=..., mode=..., axis=...)  # main thread
    result = logic.compute(job, progress, cancel)                                         # any thread
    summary = logic.apply(job, result, saveStateForUndo=...)                              # main thread

``logic.propagate(...)`` runs all three for scripts and tests. Refinement (the diffusion
refiner redraws a coarse segment and reports its uncertainty) has the same three steps:
``prepareRefine`` / ``computeRefine`` / ``applyRefine``, or ``logic.refine(...)``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import slicer

from FewShotSegLib.errors import FewShotSegError
from FewShotSegSlicerLib import geometry
from FewShotSegSlicerLib.models import ModelCatalog
from FewShotSegSlicerLib.refinement import (TOP_SLICES, RefineJob, RefineSummary, rankSlices,
                                            updateUncertaintyVolume)

MODES = ("chained", "direct")
AXES = ("auto", "axial", "coronal", "sagittal")
Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


@dataclass
class PropagationJob:
    """Everything the worker needs, copied out of MRML on the main thread."""

    volumeNode: object
    segmentationNode: object
    segmentId: str
    image: object                 # SimpleITK.Image on the volume's grid
    support: np.ndarray           # bool, volume array order: the painted voxels
    modelPath: Path
    mode: str
    axis: str                     # anatomical name, resolved from "auto"
    axisIndex: int                # numpy axis of the volume array
    device: str
    paintedSlices: list = field(default_factory=list)
    intensityGate: bool = True    # drop voxels whose intensity is far from the organ's
    prepareSeconds: float = 0.0
    notes: list = field(default_factory=list)


@dataclass
class PropagationSummary:
    slicesFilled: int
    paintedSlices: int
    voxels: int
    seconds: float                # prepare + compute + apply, as the user waits
    engineSeconds: float          # FewShotSegLib.propagation.propagate() alone
    networkSeconds: float
    mode: str
    axis: str
    device: str
    model: str

    def statusText(self) -> str:
        return (f"Filled {self.slicesFilled} slices from {self.paintedSlices} painted "
                f"({self.axis}, {self.mode}, {self.device}) in {self.seconds:.1f} s")


class FewShotSegLogic:
    """Propagates a painted segment through its volume with a few-shot checkpoint.

    Not derived from ScriptedLoadableModuleLogic: that module imports Qt, and this class
    must work on slicer-core; getParameterNode() does the same job here.
    """

    moduleName = "FewShotSeg"

    def __init__(self, catalog: Optional[ModelCatalog] = None):
        self.catalog = catalog or ModelCatalog()
        self._computeLock = threading.Lock()
        self._model = None            # (key, LoadedCheckpoint): one model kept in memory
        self._refiner = None          # (key, LoadedCheckpoint): the refiner, likewise
        self._devices = None
        self._painted = {}            # (segmentation id, segment id) -> (volume id, axis, painted slices)

    def getParameterNode(self, scene=None):
        """The module's singleton vtkMRMLScriptedModuleNode (created on first use)."""
        scene = scene or slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # CreateNodeByClass hands over a reference; the wrapper holds its own
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node

    # -- models and devices ------------------------------------------------------------------
    @property
    def isBusy(self) -> bool:
        return self._computeLock.locked()

    def availableDevices(self, refresh: bool = False) -> list[str]:
        """cpu, then cuda / mps where this PyTorch build can use them (cached; refresh after
        PyTorch was installed in this session)."""
        if self._devices is None or refresh:
            devices = ["cpu"]
            try:
                import torch

                if torch.cuda.is_available():
                    devices.append("cuda")
                mps = getattr(torch.backends, "mps", None)
                if mps is not None and mps.is_available():
                    devices.append("mps")
            except ImportError:
                pass
            self._devices = devices
        return list(self._devices)

    def defaultDevice(self) -> str:
        return self.availableDevices()[-1] if len(self.availableDevices()) > 1 else "cpu"

    def modelPath(self, model=None) -> Path:
        """A catalog name, a .pt path, or None for the default shipped model."""
        if model is None or model == "":
            model = self.catalog.defaultModelName()
            if not model:
                raise FewShotSegError("no model is installed: add a checkpoint file or download one")
        path = Path(str(model))
        if path.suffix == ".pt" or path.is_file():
            if not path.is_file():
                raise FewShotSegError(f"checkpoint not found: {path}")
            return path
        return self.catalog.resolvePath(self.catalog.find(str(model)))

    def loadModel(self, path, device: str = "cpu"):
        """LoadedCheckpoint, cached while the file and device stay the same."""
        from FewShotSegLib.checkpoints import load_checkpoint

        path = Path(path)
        key = (str(path.resolve()), path.stat().st_mtime_ns, device)
        if self._model is None or self._model[0] != key:
            self._model = None  # free the previous one before loading
            self._model = (key, load_checkpoint(path, device=device))
        return self._model[1]

    # -- step 1: main thread --------------------------------------------------------------
    def _checkInputs(self, volumeNode, segmentationNode, segmentId, axis: str) -> str:
        """Checks shared by propagate and refine; returns the segment's name for messages."""
        if axis not in AXES:
            raise FewShotSegError(f"unknown axis '{axis}'; choose one of {', '.join(AXES)}")
        geometry.checkScalarVolume(volumeNode)
        geometry.checkSegment(segmentationNode, segmentId)
        return segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()

    def _checkDevice(self, device: str) -> None:
        if device not in self.availableDevices():
            raise FewShotSegError(f"device '{device}' is not available here "
                                  f"(available: {', '.join(self.availableDevices())})")

    def prepare(self, volumeNode, segmentationNode, segmentId, model=None, mode: str = "chained",
                axis: str = "auto", device: str = "cpu", intensityGate: bool = True) -> PropagationJob:
        """Validate the inputs and copy image + painted voxels out of the scene.

        ``intensityGate``: drop the voxels whose intensity lies far from that of the
        structure's confident core (the engine's default; off keeps every voxel the model
        and registration gave)."""
        start = time.perf_counter()
        if self.isBusy:
            raise FewShotSegError("a propagation is already running: wait for it or cancel it")
        if mode not in MODES:
            raise FewShotSegError(f"unknown mode '{mode}'; choose {' or '.join(MODES)}")
        if not isinstance(intensityGate, (bool, np.bool_)):
            raise FewShotSegError(f"intensityGate must be True or False, not {intensityGate!r}")
        segmentName = self._checkInputs(volumeNode, segmentationNode, segmentId, axis)
        modelPath = self.modelPath(model)
        self._checkDevice(device)
        support = geometry.segmentToArray(segmentationNode, segmentId, volumeNode)
        if not support.any():
            if geometry.segmentHasVoxels(segmentationNode, segmentId):
                raise FewShotSegError(f"segment '{segmentName}' is painted only outside volume "
                                      f"'{volumeNode.GetName()}': paint it on a slice of that volume")
            raise FewShotSegError(f"segment '{segmentName}' is empty: paint the structure on one slice first")
        image = geometry.volumeToSitk(volumeNode)
        axisName, axisIndex = self._resolveAxis(image, support, axis)
        n = support.shape[axisIndex]
        if n < 2:
            raise FewShotSegError(f"volume '{volumeNode.GetName()}' has a single {axisName} slice: "
                                  "nothing to propagate to")
        painted = [int(i) for i in np.flatnonzero(np.moveaxis(support, axisIndex, 0).reshape(n, -1).any(1))]
        job = PropagationJob(volumeNode, segmentationNode, segmentId, image, support, modelPath, mode,
                             axisName, axisIndex, device, painted, intensityGate=bool(intensityGate))
        if len(painted) == n:
            job.notes.append(f"every {axisName} slice is painted: nothing left to fill")
        job.prepareSeconds = time.perf_counter() - start
        return job

    @staticmethod
    def _resolveAxis(image, support: np.ndarray, axis: str) -> tuple[str, int]:
        """'auto' = the anatomical axis along which the painting covers the fewest slices
        (the slice view it was painted in), axial on ties."""
        from FewShotSegLib.imageio import array_axis_for

        if axis != "auto":
            return axis, int(array_axis_for(image, axis))
        best = None
        for name in AXES[1:]:
            index = int(array_axis_for(image, name))
            moved = np.moveaxis(support, index, 0)
            count = int(moved.reshape(moved.shape[0], -1).any(1).sum())
            if best is None or count < best[0]:
                best = (count, name, index)
        return best[1], best[2]

    # -- step 2: any thread ----------------------------------------------------------------
    def compute(self, job: PropagationJob, progress: Optional[Progress] = None,
                cancel: Optional[Cancel] = None):
        """Run the engine on the copied arrays; never touches the scene."""
        if not self._computeLock.acquire(blocking=False):
            raise FewShotSegError("a propagation is already running: wait for it or cancel it")
        try:
            from FewShotSegLib.propagation import PropagationCancelled, PropagationOptions, propagate

            if progress:
                progress(0.0, "loading the model")
            model = self.loadModel(job.modelPath, job.device)
            if cancel and cancel():
                raise PropagationCancelled("propagation cancelled; the segmentation was not changed")
            options = PropagationOptions(mode=job.mode, axis=job.axis, device=job.device,
                                         intensity_gate=job.intensityGate)
            result = propagate(job.image, job.support, model, options, progress=progress, cancel=cancel)
            if result.mask.shape != job.support.shape:
                raise FewShotSegError(f"the engine returned shape {result.mask.shape}, "
                                      f"expected {job.support.shape}")
            return result
        finally:
            self._computeLock.release()

    # -- step 3: main thread ---------------------------------------------------------------
    def finalMask(self, job: PropagationJob, result) -> np.ndarray:
        """Result as bool on the volume grid; the painted voxels always stay."""
        return np.asarray(result.mask, bool) | job.support

    def resultAsOrientedImage(self, job: PropagationJob, result):
        """The result as vtkOrientedImageData, for modifySelectedSegmentByLabelmap in the effect."""
        return geometry.arrayToOrientedImage(self.finalMask(job, result), job.volumeNode, job.segmentationNode)

    def checkUnchanged(self, job, doing: str = "propagating") -> None:
        """Refuse to overwrite edits made while the worker ran (or nodes that went away)."""
        for node, what in ((job.volumeNode, "volume"), (job.segmentationNode, "segmentation")):
            if node.GetScene() is None:
                raise FewShotSegError(f"the {what} was removed while {doing}; nothing was written")
        if job.segmentationNode.GetSegmentation().GetSegment(job.segmentId) is None:
            raise FewShotSegError(f"the segment was deleted while {doing}; nothing was written")
        now = geometry.segmentToArray(job.segmentationNode, job.segmentId, job.volumeNode)
        if not np.array_equal(now, job.support):
            raise FewShotSegError(f"the segment was edited while {doing}; nothing was written: run again")

    def rememberPainted(self, job: PropagationJob) -> None:
        """The painted slices of a propagated segment: a later refinement keeps them exactly."""
        key = (job.segmentationNode.GetID(), job.segmentId)
        self._painted[key] = (job.volumeNode.GetID(), job.axis, list(job.paintedSlices))

    def apply(self, job: PropagationJob, result, saveStateForUndo: Optional[Callable[[], object]] = None,
              editorNode=None) -> PropagationSummary:
        """Write the result into the selected segment only (undo state saved once, just before)."""
        start = time.perf_counter()
        self.checkUnchanged(job)
        mask = self.finalMask(job, result)
        if saveStateForUndo is not None:
            saveStateForUndo()
        if editorNode is None:
            geometry.writeSegment(job.segmentationNode, job.segmentId, mask, job.volumeNode)
        else:
            self._applyWithEditorMasking(job, mask, editorNode)
        self.rememberPainted(job)
        return self.summarize(job, result, mask, time.perf_counter() - start)

    def _applyWithEditorMasking(self, job, mask: np.ndarray, editorNode) -> None:
        """Honour the editor's editable area and overwrite mode (Slicer's C++ editor logic)."""
        EditorLogic = getattr(slicer, "vtkSlicerSegmentEditorLogic", None)
        if EditorLogic is None:
            raise FewShotSegError("masking from the module panel needs Slicer 5.9 or later; "
                                  "use the 'Few-shot propagate' Segment Editor effect")
        settings = slicer.vtkMRMLSegmentEditorNode()  # private copy: the user's selection stays
        settings.SetMaskMode(editorNode.GetMaskMode())
        settings.SetMaskSegmentID(editorNode.GetMaskSegmentID())
        settings.SetOverwriteMode(editorNode.GetOverwriteMode())
        settings.SetSourceVolumeIntensityMask(editorNode.GetSourceVolumeIntensityMask())
        settings.SetSourceVolumeIntensityMaskRange(editorNode.GetSourceVolumeIntensityMaskRange())
        settings.SetSelectedSegmentID(job.segmentId)
        job.volumeNode.GetScene().AddNode(settings)
        try:
            logic = EditorLogic()
            logic.SetMRMLScene(job.volumeNode.GetScene())
            logic.SetSegmentEditorNode(settings)
            logic.SetSegmentationNode(job.segmentationNode)
            logic.SetSourceVolumeNode(job.volumeNode)
            modifier = geometry.arrayToOrientedImage(mask, job.volumeNode, job.segmentationNode)
            logic.ModifySegmentByLabelmap(job.segmentationNode, job.segmentId, modifier,
                                          logic.ModificationModeSet, True, False)
        finally:
            job.volumeNode.GetScene().RemoveNode(settings)

    def summarize(self, job, result, mask, applySeconds: float = 0.0) -> PropagationSummary:
        n = mask.shape[job.axisIndex]
        filled = np.moveaxis(mask, job.axisIndex, 0).reshape(n, -1).any(1)
        filled[job.paintedSlices] = False
        return PropagationSummary(
            slicesFilled=int(filled.sum()), paintedSlices=len(job.paintedSlices), voxels=int(mask.sum()),
            seconds=job.prepareSeconds + float(result.seconds) + applySeconds,
            engineSeconds=float(result.seconds),
            networkSeconds=float(getattr(result, "network_seconds", 0.0)),
            mode=job.mode, axis=job.axis, device=job.device, model=job.modelPath.stem)

    # -- refinement: the same three steps -------------------------------------------------
    def refinerPath(self, refiner=None) -> Path:
        """A refiner name (model folders), a .pt path, or None for the shipped refiner."""
        from FewShotSegLib.model_store import DEFAULT_REFINER, resolve_model_path

        if refiner is None or refiner == "":
            try:
                return resolve_model_path(None, default=DEFAULT_REFINER)
            except FewShotSegError:
                raise FewShotSegError(f"the refiner '{DEFAULT_REFINER}' is not installed: reinstall the "
                                      "extension or give a refiner checkpoint file") from None
        return resolve_model_path(refiner)

    def loadRefiner(self, path, device: str = "cpu"):
        """The refiner checkpoint (a few-shot model file is refused), cached like loadModel."""
        from FewShotSegLib.checkpoints import load_checkpoint

        path = Path(path)
        key = (str(path.resolve()), path.stat().st_mtime_ns, device)
        if self._refiner is None or self._refiner[0] != key:
            self._refiner = None
            self._refiner = (key, load_checkpoint(path, expect_kind="refiner", device=device))
        return self._refiner[1]

    def prepareRefine(self, volumeNode, segmentationNode, segmentId, samples: int = 4, steps: int = 4,
                      refiner=None, axis: str = "auto", device: str = "cpu", keepSlices=None) -> RefineJob:
        """Validate the inputs and copy image + segment out of the scene (main thread).

        ``axis`` 'auto': the axis the segment was propagated along, else axial. ``keepSlices``:
        slice indices along that axis kept exactly as they are; None = the painted slices of
        this segment's last propagation in this session (if any), [] = none.
        """
        from FewShotSegLib.refinement.sampling import RefineOptions

        start = time.perf_counter()
        if self.isBusy:
            raise FewShotSegError("a propagation or refinement is already running: wait for it or cancel it")
        RefineOptions(samples=samples, steps=steps).validate()
        segmentName = self._checkInputs(volumeNode, segmentationNode, segmentId, axis)
        refinerPath = self.refinerPath(refiner)
        self._checkDevice(device)
        coarse = geometry.segmentToArray(segmentationNode, segmentId, volumeNode)
        if not coarse.any():
            if geometry.segmentHasVoxels(segmentationNode, segmentId):
                raise FewShotSegError(f"segment '{segmentName}' lies entirely outside volume "
                                      f"'{volumeNode.GetName()}': nothing to refine on that volume")
            raise FewShotSegError(f"segment '{segmentName}' is empty: nothing to refine "
                                  "(propagate or paint it first)")
        image = geometry.volumeToSitk(volumeNode)
        remembered = self._painted.get((segmentationNode.GetID(), segmentId))
        if remembered and remembered[0] != volumeNode.GetID():
            remembered = None
        from FewShotSegLib.imageio import array_axis_for

        axisName = axis if axis != "auto" else (remembered[1] if remembered else "axial")
        axisIndex = int(array_axis_for(image, axisName))
        if keepSlices is None:
            keepSlices = remembered[2] if remembered and remembered[1] == axisName else []
        n = coarse.shape[axisIndex]
        wrong = [i for i in keepSlices if not 0 <= int(i) < n]
        if wrong:
            raise FewShotSegError(f"slices to keep {wrong} lie outside the {n} {axisName} slices "
                                  f"of volume '{volumeNode.GetName()}'")
        moved = np.moveaxis(coarse, axisIndex, 0)
        kept = sorted({int(i) for i in keepSlices if moved[int(i)].any()})
        keep = None
        if kept:
            keep = np.zeros_like(coarse)
            np.moveaxis(keep, axisIndex, 0)[kept] = moved[kept]
        job = RefineJob(volumeNode, segmentationNode, segmentId, segmentName, image, coarse, keep, refinerPath,
                        samples, steps, axisName, axisIndex, device, kept)
        if not geometry.segmentOnVolumeGrid(segmentationNode, segmentId, volumeNode):
            job.notes.append("The segment was resampled onto the volume's grid")
        job.prepareSeconds = time.perf_counter() - start
        return job

    def computeRefine(self, job: RefineJob, progress: Optional[Progress] = None,
                      cancel: Optional[Cancel] = None):
        """Run the refiner on the copied arrays (any thread); never touches the scene."""
        if not self._computeLock.acquire(blocking=False):
            raise FewShotSegError("a propagation or refinement is already running: wait for it or cancel it")
        try:
            from FewShotSegLib.refinement.sampling import RefineCancelled, RefineOptions, refine

            if progress:
                progress(0.0, "loading the refiner")
            refiner = self.loadRefiner(job.refinerPath, job.device)
            if cancel and cancel():
                raise RefineCancelled("refinement cancelled; the segmentation was not changed")
            options = RefineOptions(samples=job.samples, steps=job.steps, axis=job.axis, device=job.device)
            result = refine(job.image, job.coarse, refiner, options, progress=progress, cancel=cancel,
                            keep=job.keep)
            for name in ("mask", "uncertainty"):
                if getattr(result, name).shape != job.coarse.shape:
                    raise FewShotSegError(f"the refiner returned a {name} of shape "
                                          f"{getattr(result, name).shape}, expected {job.coarse.shape}")
            return result
        finally:
            self._computeLock.release()

    def refinedMask(self, job: RefineJob, result) -> np.ndarray:
        """The refined segment as bool on the volume grid; an empty one is refused."""
        mask = np.asarray(result.mask, bool)
        if not mask.any():
            raise FewShotSegError(f"the refiner found nothing of segment '{job.segmentName}'; "
                                  "the segment was not changed")
        return mask

    def applyRefine(self, job: RefineJob, result, saveStateForUndo: Optional[Callable[[], object]] = None,
                    editorNode=None, write: Optional[Callable[[np.ndarray], None]] = None,
                    topSlices: int = TOP_SLICES) -> RefineSummary:
        """Replace the segment by the refined one (undo state saved once, just before), then
        create or update its uncertainty volume. ``write(mask)`` replaces the writing step
        (the Segment Editor effect: its own undo state and masking)."""
        start = time.perf_counter()
        self.checkUnchanged(job, "refining")
        mask = self.refinedMask(job, result)
        top = rankSlices(result.uncertainty, job.axisIndex, job.volumeNode, job.axis, topSlices)
        if write is not None:
            write(mask)
        else:
            if saveStateForUndo is not None:
                saveStateForUndo()
            if editorNode is None:
                geometry.writeSegment(job.segmentationNode, job.segmentId, mask, job.volumeNode)
            else:
                self._applyWithEditorMasking(job, mask, editorNode)
        node = updateUncertaintyVolume(job, result.uncertainty)
        return RefineSummary(
            slicesRefined=int(result.slices_done), voxelsBefore=int(job.coarse.sum()), voxelsAfter=int(mask.sum()),
            voxelsChanged=int((mask != job.coarse).sum()), keptSlices=len(job.keptSlices),
            seconds=job.prepareSeconds + float(result.seconds) + time.perf_counter() - start,
            engineSeconds=float(result.seconds), networkSeconds=float(getattr(result, "network_seconds", 0.0)),
            samples=job.samples, steps=job.steps, axis=job.axis, device=job.device, refiner=job.refinerPath.stem,
            uncertaintyVolume=node, topSlices=top, notes=list(job.notes))

    def refine(self, volumeNode, segmentationNode, segmentId, samples: int = 4, steps: int = 4, refiner=None,
               axis: str = "auto", device: str = "cpu", keepSlices=None, progress: Optional[Progress] = None,
               cancel: Optional[Cancel] = None, saveStateForUndo=None, editorNode=None) -> RefineSummary:
        """Synchronous refinement; the segmentation is unchanged whenever this raises."""
        start = time.perf_counter()
        job = self.prepareRefine(volumeNode, segmentationNode, segmentId, samples, steps, refiner, axis, device,
                                 keepSlices)
        result = self.computeRefine(job, progress, cancel)
        summary = self.applyRefine(job, result, saveStateForUndo, editorNode)
        summary.seconds = time.perf_counter() - start
        return summary

    # -- all three, for scripts and tests --------------------------------------------------
    def propagate(self, volumeNode, segmentationNode, segmentId, model=None, mode: str = "chained",
                  axis: str = "auto", device: str = "cpu", progress: Optional[Progress] = None,
                  cancel: Optional[Cancel] = None, saveStateForUndo=None, editorNode=None,
                  intensityGate: bool = True) -> PropagationSummary:
        """Synchronous propagation; the segmentation is unchanged whenever this raises."""
        start = time.perf_counter()
        job = self.prepare(volumeNode, segmentationNode, segmentId, model, mode, axis, device, intensityGate)
        result = self.compute(job, progress, cancel)
        summary = self.apply(job, result, saveStateForUndo, editorNode)
        summary.seconds = time.perf_counter() - start
        return summary


def segmentationHistory(segmentationNode):
    """A vtkSegmentationHistory on the node, for undo outside the Segment Editor (console, tests)."""
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentationNode.GetSegmentation())
    return history


__all__ = ["FewShotSegLogic", "PropagationJob", "PropagationSummary", "RefineJob", "RefineSummary",
           "segmentationHistory", "MODES", "AXES"]
