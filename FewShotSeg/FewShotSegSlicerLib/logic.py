"""FewShotSeg logic: painted segment in, propagated segment out, no GUI.

Why a separate file: the module widget, the Segment Editor effect, the Python console and
the tests on PyPI's slicer-core all drive the same code, and none of them but the widget
may need Qt. (It lives in FewShotSegSlicerLib/ because Slicer loads every .py at the top
of the scripted-modules folder as a module.) A propagation has three steps:

    job = logic.prepare(volume, segmentation, segmentId, model=..., mode=..., axis=...)  # main thread
    handle = logic.startPropagation(job)            # the worker process computes
    while not handle.poll(): ...                    # the GUI's timer, every 100 ms
    summary = logic.apply(job, handle.outcome(), saveStateForUndo=...)                    # main thread

``logic.compute(job, progress, cancel)`` computes in this process instead (scripts, tests);
``logic.propagate(...)`` runs all steps, in the worker when ``worker=True``.

What the user drew: the segment's tag (userslices.py) records the axis, the user's slices
and a checksum of every slice the Logic wrote. prepare() takes the user's slices (recorded,
or edited since) as the support, the rest of those slices as excluded, and lets the engine
refill every other slice. Refinement (refinelogic.py) has the same three steps.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import slicer

from FewShotSegLib.errors import FewShotSegError
from FewShotSegSlicerLib import geometry, userslices
from FewShotSegSlicerLib.models import ModelCatalog
from FewShotSegSlicerLib.refinelogic import RefineMixin
from FewShotSegSlicerLib.refinement import RefineJob, RefineSummary
from FewShotSegSlicerLib.segmentslogic import SegmentsMixin

MODES = ("auto", "chained", "direct")   # auto: the model's own (a step network runs 'learned')
AXES = ("auto", "axial", "coronal", "sagittal")
# "Faster across thin slices": walks step at least this far and fill the slices between
# (twice as fast across 1.5 mm slices; a structure that moves fast across slices can be lost)
FAST_STEP_MM = 3.0
Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


@dataclass
class PropagationJob:
    """Everything the worker needs, copied out of MRML on the main thread."""

    volumeNode: object
    segmentationNode: object
    segmentId: str
    image: object                 # SimpleITK.Image on the volume's grid (None for the worker)
    support: np.ndarray           # bool, volume array order: the user's voxels
    modelPath: Path
    mode: str
    axis: str                     # anatomical name, resolved from "auto"
    axisIndex: int                # numpy axis of the volume array
    device: str
    paintedSlices: list = field(default_factory=list)   # user slices holding voxels
    intensityGate: bool = True    # drop voxels whose intensity is far from the organ's
    walkStepMm: float = 0.0       # walks step at least this far (mm) across thin slices; 0: every slice
    prepareSeconds: float = 0.0
    notes: list = field(default_factory=list)
    current: Optional[np.ndarray] = None      # bool: the whole segment as it was at prepare()
    exclude: Optional[np.ndarray] = None      # bool: never in the result (user slices' background)
    editable: Optional[np.ndarray] = None     # bool: the editor's editable area (None: everywhere)
    userSlices: list = field(default_factory=list)      # painted or erased by the user
    editedSlices: list = field(default_factory=list)    # of those, changed since the last run
    endSlices: list = field(default_factory=list)       # user slices erased to empty
    stamp: Optional[tuple] = None             # geometry.segmentStamp at prepare()
    volumeStamp: Optional[tuple] = None       # geometry.volumeStamp at prepare()


@dataclass
class LookAt:
    """A slice worth reviewing, with a point on it to jump the slice views to."""

    slice: int
    label: str
    position: tuple               # world RAS
    reason: str = ""
    score: float = 0.0
    segmentId: str = ""           # with several segments: the one to correct there


@dataclass
class PropagationSummary:
    slicesFilled: int
    paintedSlices: int            # user slices holding voxels (kept exactly)
    voxels: int
    seconds: float                # prepare + compute + apply, as the user waits
    engineSeconds: float          # FewShotSegLib.propagation.propagate() alone
    networkSeconds: float
    mode: str
    axis: str
    device: str
    model: str
    endSlices: int = 0            # user slices erased to empty: the structure ends there
    suggestions: list = field(default_factory=list)   # LookAt, best first: where to look next
    warnings: list = field(default_factory=list)

    def statusText(self) -> str:
        ends = f", {self.endSlices} erased" if self.endSlices else ""
        return (f"Filled {self.slicesFilled} slices from {self.paintedSlices} drawn{ends} "
                f"({self.axis}, {self.mode}, {self.device}) in {self.seconds:.1f} s")


class FewShotSegLogic(RefineMixin, SegmentsMixin):
    """Propagates a painted segment through its volume with a few-shot checkpoint.

    Not derived from ScriptedLoadableModuleLogic: that module imports Qt, and this class
    must work on slicer-core; getParameterNode() does the same job here. Inside Slicer use
    ``sharedLogic()``: the module panel and the effect share one (one model in memory).
    """

    moduleName = "FewShotSeg"

    def __init__(self, catalog: Optional[ModelCatalog] = None, workerPython: Optional[str] = None):
        from FewShotSegSlicerLib.workerclient import WorkerClient

        self.catalog = catalog or ModelCatalog()
        self._computeLock = threading.Lock()
        self._checkpoints = {}        # slot ("model", "refiner") -> (key, LoadedCheckpoint), in-process runs
        self._sessions = {}           # volume key -> PropagationSession (in-process runs)
        self._devices = None
        self.worker = WorkerClient(workerPython)

    def getParameterNode(self, scene=None):
        """The module's singleton vtkMRMLScriptedModuleNode (created on first use). A scene close
        resets it, module name included: restored, as Slicer's ScriptedLoadableModuleLogic does."""
        scene = scene or slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is not None and node.GetModuleName() != self.moduleName:
            node.SetModuleName(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # CreateNodeByClass hands over a reference; the wrapper holds its own
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)   # what Slicer's own parameter nodes carry
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node

    # -- models and devices ------------------------------------------------------------------
    @property
    def isBusy(self) -> bool:
        return self._computeLock.locked() or self.worker.busy

    def shutdown(self) -> None:
        """Stop the worker process (Slicer exits, tests end)."""
        self.worker.shutdown()

    def availableDevices(self, refresh: bool = False) -> list[str]:
        """cpu, then cuda / mps where this PyTorch build can use them (cached; refresh after
        PyTorch was installed in this session). Imports PyTorch into this process, seconds
        of a frozen GUI the first time: the panels ask knownDevices() instead."""
        if self._devices is None or refresh:
            from FewShotSegSlicerLib.worker import torchDevices

            self._devices = torchDevices()
        return list(self._devices)

    def knownDevices(self) -> Optional[list[str]]:
        """The devices, where that needs no PyTorch import in this process: listed before,
        PyTorch imported already, no PyTorch at all (cpu), or as the worker process listed
        them when it started (warmUp starts it); else None, and the caller asks again later."""
        if self._devices is None:
            if "torch" in sys.modules:
                return self.availableDevices()
            if importlib.util.find_spec("torch") is None:
                return ["cpu"]         # not kept: PyTorch may be installed later in this session
            reported = self.worker.devices()
            if reported is None:
                return None
            self._devices = reported
        return list(self._devices)

    def defaultDevice(self) -> str:
        """The GPU when one is known to be there, else cpu."""
        devices = self.knownDevices() or ["cpu"]
        return devices[-1] if len(devices) > 1 else "cpu"

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
        """The propagation's checkpoint (few-shot model or step network), cached."""
        from FewShotSegLib.checkpoints import PROPAGATION_KINDS
        return self._loadCheckpoint("model", path, device, PROPAGATION_KINDS)

    def _loadCheckpoint(self, slot: str, path, device: str, kinds):
        """LoadedCheckpoint of one of ``kinds``, one per slot, kept while the file and the
        device stay the same."""
        from FewShotSegLib.checkpoints import load_checkpoint

        path = Path(path)
        key = (str(path.resolve()), path.stat().st_mtime_ns, device)
        if slot not in self._checkpoints or self._checkpoints[slot][0] != key:
            self._checkpoints.pop(slot, None)  # free the previous one before loading
            self._checkpoints[slot] = (key, load_checkpoint(path, expect_kind=kinds, device=device))
        return self._checkpoints[slot][1]

    # -- step 1: main thread --------------------------------------------------------------
    def _checkInputs(self, volumeNode, segmentationNode, segmentId, axis: str) -> str:
        """Checks shared by propagate and refine; returns the segment's name for messages."""
        if axis not in AXES:
            raise FewShotSegError(f"unknown axis '{axis}'; choose one of {', '.join(AXES)}")
        geometry.checkScalarVolume(volumeNode)
        geometry.checkSegment(segmentationNode, segmentId)
        return segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()

    def _checkDevice(self, device: str, forWorker: bool = False) -> None:
        """A device PyTorch cannot use here is one clear line; the CPU is always there. For
        the worker process, against the devices it listed (PyTorch is not imported in
        Slicer's process for this): before it has, its own load reports the same line."""
        if device == "cpu":
            return
        devices = self.knownDevices() if forWorker else self.availableDevices()
        if devices is not None and device not in devices:
            raise FewShotSegError(f"device '{device}' is not available here (available: {', '.join(devices)})")

    def prepare(self, volumeNode, segmentationNode, segmentId, model=None, mode: str = "auto",
                axis: str = "auto", device: str = "cpu", intensityGate: bool = True,
                forWorker: bool = False, walkStepMm: float = 0.0, editorNode=None,
                outsideOtherSegments: bool = False) -> PropagationJob:
        """Validate the inputs and copy the user's voxels (and, unless ``forWorker``, the
        image) out of the scene.

        ``axis`` 'auto': the axis of this segment's last propagation, else the one across
        which the painting covers the fewest slices (the slice view it was painted in).
        ``intensityGate``: drop the voxels whose intensity lies far from that of the
        structure's confident core (the engine's default). ``walkStepMm``: walks step over
        slices thinner than this and fill them from the steps around them (``FAST_STEP_MM``
        for "Faster across thin slices"; 0, the default, steps on every slice). ``editorNode``:
        the Segment Editor's settings, whose editable area the walks then stay inside.
        ``outsideOtherSegments`` (the module panel): the same with the area 'outside all
        segments'."""
        start = time.perf_counter()
        if self.isBusy:
            raise FewShotSegError("a propagation is already running: wait for it or cancel it")
        if mode not in MODES:
            raise FewShotSegError(f"unknown mode '{mode}'; choose {' or '.join(MODES)}")
        for name, value in (("intensityGate", intensityGate), ("outsideOtherSegments", outsideOtherSegments)):
            if not isinstance(value, (bool, np.bool_)):
                raise FewShotSegError(f"{name} must be True or False, not {value!r}")
        if isinstance(walkStepMm, bool) or not isinstance(walkStepMm, (int, float)) or not 0 <= walkStepMm <= 100:
            raise FewShotSegError(f"walkStepMm must be a number of mm in [0, 100], not {walkStepMm!r}")
        segmentName = self._checkInputs(volumeNode, segmentationNode, segmentId, axis)
        modelPath = self.modelPath(model)
        self._checkDevice(device, forWorker)
        current = geometry.paintedSegmentArray(
            segmentationNode, segmentId, volumeNode, segmentName,
            outside=("is painted only outside", "paint it on a slice of that volume"),
            empty="paint the structure on one slice first")
        if forWorker:
            geometry.checkFinite(volumeNode)
            image = None
            axisImage = geometry.directionImage(volumeNode)
        else:
            image = axisImage = geometry.volumeToSitk(volumeNode)
        users = self._userSlices(volumeNode, segmentationNode, segmentId, current, axisImage, axis)
        axisIndex = users.axis
        axisName = geometry.axisName(axisImage, axisIndex)
        n = current.shape[axisIndex]
        if n < 2:
            raise FewShotSegError(f"volume '{volumeNode.GetName()}' has a single {axisName} slice: "
                                  "nothing to propagate to")
        support, exclude = userslices.supportAndExclude(current, axisIndex, users.user)
        painted = userslices.nonEmptySlices(support, axisIndex)
        job = PropagationJob(volumeNode, segmentationNode, segmentId, image, support, modelPath, mode,
                             axisName, axisIndex, device, painted, intensityGate=bool(intensityGate),
                             walkStepMm=float(walkStepMm),
                             current=current, exclude=exclude, userSlices=list(users.user),
                             editedSlices=list(users.edited),
                             endSlices=[i for i in users.user if i not in set(painted)],
                             stamp=geometry.segmentStamp(segmentationNode, segmentId),
                             volumeStamp=geometry.volumeStamp(volumeNode))
        if outsideOtherSegments and editorNode is None:
            if getattr(slicer, "vtkSlicerSegmentEditorLogic", None) is None:
                raise FewShotSegError("'Stay outside other segments' needs Slicer 5.9 or later; use the "
                                      "Segment Editor effect with the editable area 'Outside all segments'")
            editorNode = slicer.vtkMRMLSegmentEditorNode()   # private settings, never in the scene
            editorNode.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
        if editorNode is not None:
            job.editable = self.editableArea(volumeNode, segmentationNode, segmentId, editorNode)
        if len(users.user) == n:
            job.notes.append(f"every {axisName} slice was drawn by the user: nothing left to fill")
        job.prepareSeconds = time.perf_counter() - start
        return job

    def _userSlices(self, volumeNode, segmentationNode, segmentId, current, axisImage, axis) -> userslices.UserSlices:
        grid = userslices.gridFingerprint(volumeNode)
        record = userslices.read(segmentationNode, segmentId)
        if axis != "auto":
            from FewShotSegLib.imageio import array_axis_for

            return userslices.classify(current, record, int(array_axis_for(axisImage, axis)), grid)
        if record is not None and record.grid == grid and tuple(record.shape) == current.shape:
            users = userslices.classify(current, record, record.axis, grid)
            if not users.fresh:
                return users
        # the engine's rule: the axis across which the painting lies in the fewest slices; a
        # painting in two planes, or strips of a view turned against the slices, is one line
        from FewShotSegLib.anchors import resolve_axis

        return userslices.classify(current, None, resolve_axis(axisImage, current, "auto"), grid)

    def rememberedSlices(self, volumeNode, segmentationNode, segmentId):
        """(axis index, user slices incl. edits since the last run) from the segment's
        record, or None when it has none for this volume."""
        record = userslices.read(segmentationNode, segmentId)
        if record is None or record.grid != userslices.gridFingerprint(volumeNode):
            return None
        current = geometry.segmentToArray(segmentationNode, segmentId, volumeNode)
        if tuple(record.shape) != current.shape:
            return None
        users = userslices.classify(current, record, record.axis, record.grid)
        return record.axis, list(users.user)

    # -- step 2: the worker process, or any thread of this one ---------------------------------
    def warmUp(self, model=None, device: str = "cpu") -> bool:
        """Start the worker process and load the model while the user paints (the effect
        and the panel call this when shown). False if the model cannot be found."""
        try:
            path = self.modelPath(model)
        except FewShotSegError:
            return False
        self.worker.warmUp(path, device)
        return True

    def startPropagation(self, job: PropagationJob):
        """Send the job to the worker process (started on first use; the volume is sent only
        when it does not hold it). Poll the returned handle; it never blocks."""
        array, volumeGeometry, volumeKey = geometry.workerVolume(job.volumeNode, job.image)
        # one PropagationSession per volume: its walks are keyed by their anchors
        return self.worker.start(job, array, volumeGeometry, volumeKey, sessionKey=volumeKey)

    def compute(self, job: PropagationJob, progress: Optional[Progress] = None,
                cancel: Optional[Cancel] = None):
        """Run the engine in this process on the copied arrays; never touches the scene."""
        if not self._computeLock.acquire(blocking=False):
            raise FewShotSegError("a propagation is already running: wait for it or cancel it")
        try:
            from FewShotSegLib.propagation import PropagationCancelled
            from FewShotSegSlicerLib import engine

            if job.image is None:
                raise FewShotSegError("this job was prepared for the worker process: use startPropagation")
            if progress:
                progress(0.0, "loading the model")
            model = self.loadModel(job.modelPath, job.device)
            if cancel and cancel():
                raise PropagationCancelled("propagation cancelled; the segmentation was not changed")
            key = (job.volumeNode.GetID(), job.volumeNode.GetImageData().GetMTime())
            session = self._sessions.get(key)
            if session is None:
                self._sessions = {key: engine.newSession()}  # one volume's session kept
                session = self._sessions[key]
            result = engine.run(job.image, job.support, model, job.mode, job.axisIndex, job.axis, job.device,
                                job.intensityGate, exclude=job.exclude, session=session, progress=progress,
                                cancel=cancel, walkStepMm=job.walkStepMm, editable=job.editable)
            return engine.EngineResult.fromEngine(result)
        finally:
            self._computeLock.release()

    # -- step 3: main thread ---------------------------------------------------------------
    def finalMask(self, job: PropagationJob, result) -> np.ndarray:
        """Result as bool on the volume grid: the user's voxels always, the excluded and
        those outside the editable area never."""
        mask = np.asarray(result.mask, bool)
        if job.editable is not None:
            mask &= job.editable
        mask |= job.support
        if job.exclude is not None:
            mask &= ~job.exclude
        return mask

    def resultAsOrientedImage(self, job: PropagationJob, result, editorNode=None):
        """The result as vtkOrientedImageData, for modifySelectedSegmentByLabelmap in the effect
        (the box of its voxels unless ``editorNode``'s settings mask the write)."""
        return geometry.arrayToOrientedImage(self.finalMask(job, result), job.volumeNode, job.segmentationNode,
                                             crop=True)

    def checkUnchanged(self, job, doing: str = "propagating") -> None:
        """Refuse to overwrite edits made while the worker ran (or nodes that went away)."""
        for node, what in ((job.volumeNode, "volume"), (job.segmentationNode, "segmentation")):
            if node.GetScene() is None:
                raise FewShotSegError(f"the {what} was removed while {doing}; nothing was written")
        if job.segmentationNode.GetSegmentation().GetSegment(job.segmentId) is None:
            raise FewShotSegError(f"the segment was deleted while {doing}; nothing was written")
        volumeStamp = getattr(job, "volumeStamp", None)
        if volumeStamp is not None and geometry.volumeStamp(job.volumeNode) != volumeStamp:
            raise FewShotSegError(f"the volume's voxels or geometry changed while {doing}; nothing was written: "
                                  "run again")
        stamp = getattr(job, "stamp", None)
        if stamp is not None and geometry.segmentStamp(job.segmentationNode, job.segmentId) == stamp:
            return  # the labelmap was neither modified nor replaced: no need to read it back
        now = geometry.segmentToArray(job.segmentationNode, job.segmentId, job.volumeNode)
        before = job.current if getattr(job, "current", None) is not None else job.support
        if not np.array_equal(now, before):
            raise FewShotSegError(f"the segment was edited while {doing}; nothing was written: run again")

    def recordWritten(self, volumeNode, segmentationNode, segmentId, mask: Optional[np.ndarray], axisIndex: int,
                      userSlices=None, keepOnly: bool = False) -> None:
        """Store the user's slices and a checksum of every written slice with the segment.

        ``mask`` is what was written, None to read the segment back (editor masking may
        have changed it); a segment stored on another grid is always read back. ``keepOnly``: update the checksums of an existing
        record only (refinement), keeping its user slices."""
        record = userslices.read(segmentationNode, segmentId)
        if keepOnly:
            if record is None or record.axis != axisIndex:
                return
            userSlices = record.user
        if mask is None or not geometry.segmentOnVolumeGrid(segmentationNode, segmentId, volumeNode):
            mask = geometry.segmentToArray(segmentationNode, segmentId, volumeNode)
        userslices.write(segmentationNode, segmentId, userslices.SliceRecord(
            axisIndex, tuple(mask.shape), userslices.gridFingerprint(volumeNode), sorted(set(userSlices or [])),
            userslices.sliceChecksums(mask, axisIndex)))

    def rememberPainted(self, job: PropagationJob, mask: Optional[np.ndarray] = None) -> None:
        """Record the user's slices with the segment after ``job``'s result was written
        (``mask``: what was written; None reads the segment back)."""
        self.recordWritten(job.volumeNode, job.segmentationNode, job.segmentId, mask, job.axisIndex,
                           job.userSlices or job.paintedSlices)

    def apply(self, job: PropagationJob, result, saveStateForUndo: Optional[Callable[[], object]] = None,
              editorNode=None) -> PropagationSummary:
        """Write the result into the selected segment only (undo state saved once, just before)."""
        start = time.perf_counter()
        self.checkUnchanged(job)
        mask = self.finalMask(job, result)
        self.writeMask(job, mask, saveStateForUndo, editorNode)
        self.rememberPainted(job, mask if editorNode is None else None)
        return self.summarize(job, result, mask, time.perf_counter() - start)

    def writeMask(self, job, mask: np.ndarray, saveStateForUndo=None, editorNode=None) -> None:
        """Replace the job's segment by ``mask``: one undo state just before; through the
        editor's masking and overwrite settings when ``editorNode`` is given."""
        if saveStateForUndo is not None:
            saveStateForUndo()
        if editorNode is None:
            geometry.writeSegment(job.segmentationNode, job.segmentId, mask, job.volumeNode)
        else:
            self._applyWithEditorMasking(job, mask, editorNode)

    def _applyWithEditorMasking(self, job, mask: np.ndarray, editorNode) -> None:
        """Honour the editor's editable area and overwrite mode (Slicer's C++ editor logic)."""
        with _editorLogic(job.volumeNode, job.segmentationNode, job.segmentId, editorNode) as logic:
            modifier = geometry.arrayToOrientedImage(mask, job.volumeNode, job.segmentationNode,
                                                     crop=not geometry.editorMasks(editorNode))
            logic.ModifySegmentByLabelmap(job.segmentationNode, job.segmentId, modifier,
                                          logic.ModificationModeSet, True, False)

    def editableArea(self, volumeNode, segmentationNode, segmentId, editorNode) -> Optional[np.ndarray]:
        """Where the Segment Editor lets this segment change (its editable area and source
        intensity range) as bool on the volume grid; None when that is everywhere, or
        before Slicer 5.9 (the area then applies only when the result is written). Why:
        masking only what is written lets a walk carry the structure across another
        segment and on over the tissue beyond it."""
        if getattr(slicer, "vtkSlicerSegmentEditorLogic", None) is None:
            return None
        editable = None
        if editorNode.GetMaskMode() != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
            with _editorLogic(volumeNode, segmentationNode, segmentId, editorNode) as logic:
                if not logic.UpdateMaskLabelmap():
                    raise FewShotSegError("the Segment Editor's editable area could not be computed")
                # the mask labelmap is 1 where editing is not allowed
                editable = ~geometry.orientedImageToArray(logic.GetMaskLabelmap(), volumeNode, segmentationNode)
        if editorNode.GetSourceVolumeIntensityMask():
            low, high = editorNode.GetSourceVolumeIntensityMaskRange()
            values = slicer.util.arrayFromVolume(volumeNode)
            inRange = (values >= low) & (values <= high)
            editable = inRange if editable is None else editable & inRange
        if editable is not None and not editable.any():
            raise FewShotSegError("the Segment Editor's editable area holds no voxel of this volume: "
                                  "change 'Editable area' or 'Editable intensity range'")
        return None if editable is None or editable.all() else editable

    def summarize(self, job, result, mask, applySeconds: float = 0.0) -> PropagationSummary:
        n = mask.shape[job.axisIndex]
        filled = np.moveaxis(mask, job.axisIndex, 0).reshape(n, -1).any(1)
        filled[job.userSlices or job.paintedSlices] = False
        return PropagationSummary(
            slicesFilled=int(filled.sum()), paintedSlices=len(job.paintedSlices), voxels=int(mask.sum()),
            seconds=job.prepareSeconds + float(result.seconds) + applySeconds,
            engineSeconds=float(result.seconds),
            networkSeconds=float(getattr(result, "network_seconds", 0.0)),
            mode=getattr(result, "mode", "") or job.mode, axis=job.axis, device=job.device, model=job.modelPath.stem,
            endSlices=len(job.endSlices), suggestions=self.lookAt(job, result, mask),
            warnings=list(getattr(result, "warnings", []) or []))

    @staticmethod
    def lookAt(job, result, mask: np.ndarray, limit: int = 5) -> list:
        """The engine's suggestions as slices to jump to (user slices left out)."""
        out = []
        for s in list(getattr(result, "suggestions", []) or []):
            index = int(s.slice)
            if index in job.userSlices or not 0 <= index < mask.shape[job.axisIndex]:
                continue
            reason = str(getattr(s, "reason", ""))
            label = f"{job.axis} slice {index}" + (f": {reason}" if reason else "")
            out.append(LookAt(index, label, geometry.slicePosition(job.volumeNode, job.axisIndex, index, mask),
                              reason, float(getattr(s, "score", 0.0))))
            if len(out) == limit:
                break
        return out

    # -- all steps, for scripts and tests --------------------------------------------------
    def propagate(self, volumeNode, segmentationNode, segmentId, model=None, mode: str = "auto",
                  axis: str = "auto", device: str = "cpu", progress: Optional[Progress] = None,
                  cancel: Optional[Cancel] = None, saveStateForUndo=None, editorNode=None,
                  intensityGate: bool = True, worker: bool = False, walkStepMm: float = 0.0,
                  outsideOtherSegments: bool = False) -> PropagationSummary:
        """Synchronous propagation, in this process or (``worker=True``) in the worker
        process; the segmentation is unchanged whenever this raises."""
        start = time.perf_counter()
        job = self.prepare(volumeNode, segmentationNode, segmentId, model, mode, axis, device, intensityGate,
                           forWorker=worker, walkStepMm=walkStepMm, editorNode=editorNode,
                           outsideOtherSegments=outsideOtherSegments)
        if worker:
            result = self.startPropagation(job).follow(progress, cancel)
        else:
            result = self.compute(job, progress, cancel)
        summary = self.apply(job, result, saveStateForUndo, editorNode)
        summary.seconds = time.perf_counter() - start
        return summary


@contextmanager
def _editorLogic(volumeNode, segmentationNode, segmentId, editorNode):
    """Slicer's C++ segment editor logic on a private copy of the user's editor settings
    (the user's node, and its selected segment, stay as they are)."""
    EditorLogic = getattr(slicer, "vtkSlicerSegmentEditorLogic", None)
    if EditorLogic is None:
        raise FewShotSegError("masking from the module panel needs Slicer 5.9 or later; "
                              "use the 'Few-shot propagate' Segment Editor effect")
    settings = slicer.vtkMRMLSegmentEditorNode()
    settings.SetMaskMode(editorNode.GetMaskMode())
    settings.SetMaskSegmentID(editorNode.GetMaskSegmentID())
    settings.SetOverwriteMode(editorNode.GetOverwriteMode())
    settings.SetSourceVolumeIntensityMask(editorNode.GetSourceVolumeIntensityMask())
    settings.SetSourceVolumeIntensityMaskRange(editorNode.GetSourceVolumeIntensityMaskRange())
    settings.SetSelectedSegmentID(segmentId)
    volumeNode.GetScene().AddNode(settings)
    try:
        logic = EditorLogic()
        logic.SetMRMLScene(volumeNode.GetScene())
        logic.SetSegmentEditorNode(settings)
        logic.SetSegmentationNode(segmentationNode)
        logic.SetSourceVolumeNode(volumeNode)
        yield logic
    finally:
        volumeNode.GetScene().RemoveNode(settings)


_SHARED = []


def sharedLogic() -> FewShotSegLogic:
    """The one Logic of this Slicer session: the module panel and the effect share its
    model, worker process and running job."""
    if not _SHARED:
        _SHARED.append(FewShotSegLogic())
    return _SHARED[0]


def shutdownSharedLogic() -> None:
    """Stop the shared Logic's worker if there is one (Slicer quits; nothing is created)."""
    if _SHARED:
        _SHARED[0].shutdown()


def segmentationHistory(segmentationNode):
    """A vtkSegmentationHistory on the node, for undo outside the Segment Editor (console, tests)."""
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentationNode.GetSegmentation())
    return history


__all__ = ["FewShotSegLogic", "LookAt", "PropagationJob", "PropagationSummary", "RefineJob", "RefineSummary",
           "segmentationHistory", "sharedLogic", "shutdownSharedLogic", "MODES", "AXES"]
