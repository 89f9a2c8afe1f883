"""Propagate every painted segment of a segmentation in one click (no Qt here).

Each segment is prepared as for one (its user slices, erased slices and editable area kept
with it), all of them run in one engine call (FewShotSegLib.structures: the voxels two
segments' results claim go to the segment painted nearest), and the results are written
together after one undo state; if any segment changed meanwhile, none is written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from FewShotSegLib.errors import FewShotSegError
from FewShotSegSlicerLib import geometry


@dataclass
class SegmentsJob:
    """One PropagationJob per segment, run together."""

    jobs: list
    prepareSeconds: float = 0.0

    # what the worker client reads of a job (the volume, the grid, the device)
    @property
    def volumeNode(self):
        return self.jobs[0].volumeNode

    @property
    def image(self):
        return self.jobs[0].image

    @property
    def support(self) -> np.ndarray:
        return self.jobs[0].support

    @property
    def device(self) -> str:
        return self.jobs[0].device

    @property
    def axis(self) -> str:
        return self.jobs[0].axis

    def names(self) -> list:
        """The segments' names, for progress messages."""
        return [_name(job) for job in self.jobs]


@dataclass
class SegmentsSummary:
    summaries: dict = field(default_factory=dict)   # segment ID -> PropagationSummary
    names: dict = field(default_factory=dict)       # segment ID -> name
    seconds: float = 0.0

    def statusText(self) -> str:
        filled = sum(s.slicesFilled for s in self.summaries.values())
        return (f"Filled {len(self.summaries)} segments ({filled} slices; where two met, the voxels went to the "
                f"one drawn nearest) in {self.seconds:.1f} s")

    @property
    def warnings(self) -> list:
        return [f"{self.names[sid]}: {w}" for sid, s in self.summaries.items() for w in s.warnings]

    @property
    def suggestions(self) -> list:
        """Every segment's slices to check, the most likely wrong first, named by segment."""
        items = [replace(look, label=f"{self.names[sid]}: {look.label}", segmentId=sid)
                 for sid, s in self.summaries.items() for look in s.suggestions]
        return sorted(items, key=lambda look: -look.score)


class SegmentsMixin:
    """FewShotSegLogic's several-segment propagation (uses its prepare, compute pieces and writers)."""

    def paintedSegmentIds(self, segmentationNode) -> list:
        """The segments holding voxels, in the segmentation's order (read where they are
        stored: ``prepare`` reads each onto the volume's grid once, and says so when one lies
        outside the volume)."""
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(index) for index in range(segmentation.GetNumberOfSegments())]
        return [sid for sid in ids if geometry.segmentHasVoxels(segmentationNode, sid)]

    def prepareSegments(self, volumeNode, segmentationNode, segmentIds=None, **options) -> SegmentsJob:
        """Prepare each segment as ``prepare`` does (``options`` are its keyword arguments);
        ``segmentIds`` None: every segment holding voxels. Two segments painted on the same
        voxel is an error naming both."""
        start = time.perf_counter()
        if segmentationNode is None or volumeNode is None:
            raise FewShotSegError("choose a volume and a segmentation first")
        if isinstance(segmentIds, str):
            raise FewShotSegError("segmentIds is a list of segment IDs (or None for every painted segment), "
                                  f"not one ID: use [{segmentIds!r}]")
        ids = self.paintedSegmentIds(segmentationNode) if segmentIds is None else list(segmentIds)
        if len(set(ids)) != len(ids):
            raise FewShotSegError(f"segment IDs listed twice: {sorted({i for i in ids if ids.count(i) > 1})}")
        if not ids:
            raise FewShotSegError(f"no segment of '{segmentationNode.GetName()}' holds voxels on this volume: "
                                  "paint each structure on one slice first")
        jobs = []
        for sid in ids:
            try:
                jobs.append(self.prepare(volumeNode, segmentationNode, sid, **options))
            except FewShotSegError as error:   # say which of the segments, once
                name = geometry.segmentName(segmentationNode, sid)
                raise error if f"'{name}'" in str(error) else FewShotSegError(f"segment '{name}': {error}") from error
        painted = np.zeros(jobs[0].support.shape, np.int32)
        for k, job in enumerate(jobs, start=1):
            both = painted[job.support]
            if both.any():
                other = jobs[int(both[both > 0][0]) - 1]
                raise FewShotSegError(f"segments '{_name(other)}' and '{_name(job)}' are both drawn on the same "
                                      "voxels: they cannot be propagated together (remove one from the other, or "
                                      "propagate them one at a time)")
            painted[job.support] = k
        return SegmentsJob(jobs, time.perf_counter() - start)

    def startSegments(self, job: SegmentsJob):
        """Send the segments to the worker process as one job; poll the returned handle."""
        array, volumeGeometry, volumeKey = geometry.workerVolume(job.volumeNode, job.image)
        return self.worker.startStructures(job, array, volumeGeometry, volumeKey, sessionKey=volumeKey)

    def computeSegments(self, job: SegmentsJob, progress: Optional[Callable] = None,
                        cancel: Optional[Callable] = None) -> list:
        """The engine in this process on the copied arrays (scripts, tests); one result per segment."""
        from FewShotSegSlicerLib import engine

        first = job.jobs[0]
        if first.image is None:
            raise FewShotSegError("this job was prepared for the worker process: use startSegments")
        model = self.loadModel(first.modelPath, first.device)
        parts = [{"support": j.support, "exclude": j.exclude, "editable": j.editable, "axisIndex": j.axisIndex,
                  "name": name} for j, name in zip(job.jobs, job.names())]
        result = engine.runStructures(first.image, parts, model, first.mode, first.device, first.intensityGate,
                                      progress=progress, cancel=cancel, walkStepMm=first.walkStepMm)
        return [engine.EngineResult(result.labels == value, engine.summary(result.results[value]))
                for value in range(1, len(parts) + 1)]

    def applySegments(self, job: SegmentsJob, results: list, saveStateForUndo=None, editorNode=None) -> SegmentsSummary:
        """Write every segment's result after one undo state; nothing is written when any
        segment was edited, deleted or removed meanwhile."""
        start = time.perf_counter()
        for one in job.jobs:
            self.checkUnchanged(one)
        if saveStateForUndo is not None:
            saveStateForUndo()
        out = SegmentsSummary()
        for one, result in zip(job.jobs, results):
            mask = self.finalMask(one, result)
            self.writeMask(one, mask, None, editorNode)
            self.rememberPainted(one, mask if editorNode is None else None)
            out.summaries[one.segmentId] = self.summarize(one, result, mask)
            out.names[one.segmentId] = _name(one)
        # the segments ran one after another in the engine
        out.seconds = job.prepareSeconds + sum(float(r.seconds) for r in results) + time.perf_counter() - start
        return out

    def propagateSegments(self, volumeNode, segmentationNode, segmentIds=None, saveStateForUndo=None,
                          editorNode=None, progress=None, cancel=None, worker: bool = False,
                          **options) -> SegmentsSummary:
        """Synchronous, for scripts and tests; the segmentation is unchanged whenever this raises."""
        start = time.perf_counter()
        job = self.prepareSegments(volumeNode, segmentationNode, segmentIds, forWorker=worker,
                                   editorNode=editorNode, **options)
        results = self.startSegments(job).follow(progress, cancel) if worker else \
            self.computeSegments(job, progress, cancel)
        summary = self.applySegments(job, results, saveStateForUndo, editorNode)
        summary.seconds = time.perf_counter() - start
        return summary


def _name(job) -> str:
    return geometry.segmentName(job.segmentationNode, job.segmentId)
