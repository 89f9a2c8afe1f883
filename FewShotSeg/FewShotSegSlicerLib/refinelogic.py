"""Refinement for FewShotSegLogic: the diffusion refiner redraws a segment and reports
where it is unsure. Same three steps as propagation: prepare on the main thread, compute in
the worker process (startRefine; Slicer's main loop holds the GIL, so a thread of its
interpreter would barely run) or in this process (computeRefine: scripts, tests), apply
on the main thread.

The slices kept exactly are the user's slices recorded with the segment (userslices.py),
so a Refine after Propagate keeps what the user drew; the record is updated after the
refined segment is written, so the next Propagate does not take refined slices for edits.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from FewShotSegLib.errors import FewShotSegError
from FewShotSegSlicerLib import geometry
from FewShotSegSlicerLib.refinement import (TOP_SLICES, RefineJob, RefineSummary, rankSlices,
                                            updateUncertaintyVolume)

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


# a segment on this many slices or fewer, never propagated, is a painting (not a segmentation
# made elsewhere, which Refine is meant to redraw): the status line says Refine redrew it
PAINTING_SLICES = 3


class RefineMixin:
    """Methods of FewShotSegLogic; they use its _computeLock, _checkInputs, _checkDevice,
    isBusy, checkUnchanged, writeMask and rememberedSlices."""

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
        return self._loadCheckpoint("refiner", path, device, "refiner")

    def prepareRefine(self, volumeNode, segmentationNode, segmentId, samples: int = 4, steps: int = 4,
                      refiner=None, axis: str = "auto", device: str = "cpu", keepSlices=None,
                      forWorker: bool = False) -> RefineJob:
        """Validate the inputs and copy the segment (and, unless ``forWorker``, the image)
        out of the scene (main thread).

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
        self._checkDevice(device, forWorker)
        coarse = geometry.paintedSegmentArray(
            segmentationNode, segmentId, volumeNode, segmentName,
            outside=("lies entirely outside", "nothing to refine on that volume"),
            empty="nothing to refine (propagate or paint it first)")
        if forWorker:
            geometry.checkFinite(volumeNode)
            image, axisImage = None, geometry.directionImage(volumeNode)
        else:
            image = axisImage = geometry.volumeToSitk(volumeNode)
        record = self.rememberedSlices(volumeNode, segmentationNode, segmentId)  # (axis index, user slices)
        from FewShotSegLib.imageio import array_axis_for

        if axis != "auto":
            axisName = axis
        else:
            axisName = geometry.axisName(axisImage, record[0]) if record else "axial"
        axisIndex = int(array_axis_for(axisImage, axisName))
        if keepSlices is None:
            keepSlices = record[1] if record and record[0] == axisIndex else []
        n = coarse.shape[axisIndex]
        if isinstance(keepSlices, (str, bytes)) or not hasattr(keepSlices, "__iter__") or any(
                isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in keepSlices):
            raise FewShotSegError(f"keepSlices is a list of slice numbers, not {keepSlices!r}")
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
        job.volumeStamp = geometry.volumeStamp(volumeNode)
        if record is None and not kept and int(moved.reshape(n, -1).any(1).sum()) <= PAINTING_SLICES:
            job.notes.append("Nothing propagated yet, so the painted slices were redrawn too: paint, Propagate, "
                             "then Refine to keep them")
        if not geometry.segmentOnVolumeGrid(segmentationNode, segmentId, volumeNode):
            job.notes.append("The segment was resampled onto the volume's grid")
        job.prepareSeconds = time.perf_counter() - start
        return job

    def startRefine(self, job: RefineJob):
        """Send the job to the worker process (started on first use; the volume is sent only
        when it does not hold it). Poll the returned handle; it never blocks. Its result
        has the mask and the uncertainty that applyRefine takes."""
        array, volumeGeometry, volumeKey = geometry.workerVolume(job.volumeNode, job.image)
        return self.worker.startRefine(job, array, volumeGeometry, volumeKey)

    def computeRefine(self, job: RefineJob, progress: Optional[Progress] = None,
                      cancel: Optional[Cancel] = None):
        """Run the refiner in this process on the copied arrays (any thread); never touches the scene."""
        if not self._computeLock.acquire(blocking=False):
            raise FewShotSegError("a propagation or refinement is already running: wait for it or cancel it")
        try:
            from FewShotSegLib.refinement.sampling import RefineCancelled
            from FewShotSegSlicerLib import engine

            if job.image is None:
                raise FewShotSegError("this job was prepared for the worker process: use startRefine")
            if progress:
                progress(0.0, "loading the refiner")
            refiner = self.loadRefiner(job.refinerPath, job.device)
            if cancel and cancel():
                raise RefineCancelled("refinement cancelled; the segmentation was not changed")
            return engine.refine(job.image, job.coarse, job.keep, refiner, job.samples, job.steps, job.axis,
                                 job.device, progress=progress, cancel=cancel)
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
            self.writeMask(job, mask, saveStateForUndo, editorNode)
        self.recordWritten(job.volumeNode, job.segmentationNode, job.segmentId, mask, job.axisIndex, keepOnly=True)
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
               cancel: Optional[Cancel] = None, saveStateForUndo=None, editorNode=None,
               worker: bool = False) -> RefineSummary:
        """Synchronous refinement, in this process or (``worker=True``) in the worker
        process; the segmentation is unchanged whenever this raises."""
        start = time.perf_counter()
        job = self.prepareRefine(volumeNode, segmentationNode, segmentId, samples, steps, refiner, axis, device,
                                 keepSlices, forWorker=worker)
        if worker:
            result = self.startRefine(job).follow(progress, cancel)
        else:
            result = self.computeRefine(job, progress, cancel)
        summary = self.applyRefine(job, result, saveStateForUndo, editorNode)
        summary.seconds = time.perf_counter() - start
        return summary
