"""FewShotSeg: paint a structure on one slice, click once, get it through the whole volume.

Thin module file (Slicer convention): Module, Widget and Test only; it is the only .py at
the top of the module folder, since Slicer loads each one there as a module. The work is
in FewShotSegSlicerLib/logic.py (no Qt; one shared Logic per session, which runs the
propagation in a worker process), helpers in FewShotSegSlicerLib/, the Segment Editor
effect in FewShotSegEffect/ and the engine in the FewShotSegLib package installed beside it.
"""
import logging
import os
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from FewShotSegSlicerLib.logic import AXES, FAST_STEP_MM, MODES, sharedLogic, shutdownSharedLogic


class FewShotSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FewShotSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["FewShotSeg contributors"]
        self.parent.helpText = (
            "Paint a structure on one slice (Segment Editor), then click Propagate: a few-shot "
            "model fills the other slices. To correct, paint or erase any slice and Propagate again: "
            "the slices you drew stay, the others are refilled; the list shows the slices most worth "
            "checking (click one to jump there). Refine redraws the segment with a diffusion refiner, "
            "shows where it is uncertain and lists the slices to review first. Both are also in "
            "the 'Few-shot propagate' Segment Editor effect. "
            "See <a href='https://github.com/fewshotseg/SlicerFewShotSeg'>the project page</a>.")
        self.parent.acknowledgementText = "Models follow SSL-ALPNet / CRTPNet few-shot segmentation."
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)
        # once per session, whether the panel or only the effect was used
        slicer.app.connect("aboutToQuit()", shutdownSharedLogic)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        instance = effects.qSlicerSegmentEditorScriptedEffect(None)
        path = os.path.join(os.path.dirname(__file__), "FewShotSegEffect",
                            "SegmentEditorFewShotPropagateEffect.py")
        instance.setPythonSource(path.replace("\\", "/"))
        instance.self().register()


@parameterNodeWrapper
class FewShotSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    model: str = ""
    mode: Annotated[str, Choice(list(MODES))] = "auto"
    axis: Annotated[str, Choice(list(AXES))] = "auto"
    device: Annotated[str, Choice(["cpu", "cuda", "mps"])] = "cpu"
    intensityGate: bool = True
    fastThinSlices: bool = False
    outsideOtherSegments: bool = False
    allSegments: bool = False
    # the ranges again here: connecting the panel replaces the .ui's spin box limits
    refineSamples: Annotated[int, WithinRange(1, 32)] = 4
    refineSteps: Annotated[int, WithinRange(1, 50)] = 4


class FewShotSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        # first: given no parent, Slicer's base class calls setup() from its __init__
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiObserver = None
        self._uncertainSlices = []
        self._listRebuilt = False
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        from FewShotSegSlicerLib.qtsupport import TaskRunner

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FewShotSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = sharedLogic()  # the effect uses the same one: one model, one worker
        self.runner = TaskRunner(self.ui.propagateButton, self.ui.progressBar, self.ui.statusLabel)
        self.refineRunner = TaskRunner(self.ui.refineButton, self.ui.progressBar, self.ui.statusLabel,
                                       startText="Refine")
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagateButton)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.uncertainSlicesList.connect("itemClicked(QListWidgetItem*)", self.onUncertainSliceClicked)
        self.devicesTimer = qt.QTimer()
        self.devicesTimer.setInterval(250)
        self.devicesTimer.connect("timeout()", self.onDevicesPoll)
        self._devicesPolls = 0
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        """Before the panel is deleted (reload, quit): nothing may call into its widgets after."""
        self.devicesTimer.stop()
        self.runner.stop()
        self.refineRunner.stop()
        self.setParameterNode(None)    # the parameter node outlives the panel: disconnect its widgets
        self.removeObservers()

    def enter(self):
        from FewShotSegSlicerLib import dependencies

        self.initializeParameterNode()
        p = self._parameterNode
        if p and dependencies.torchAvailable() and not dependencies.missingPackages():
            self.logic.warmUp(p.model or None, p.device)  # the worker loads the model while the user paints
        if self.logic.knownDevices() is None:   # the worker lists them once it has imported PyTorch
            self.devicesTimer.start()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.runner.stop()
        self.refineRunner.stop()
        self.showUncertainSlices([])
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(FewShotSegParameterNode(self.logic.getParameterNode()))
        p = self._parameterNode
        if not p.inputVolume:   # not a labelmap (a subclass the volume selector does not show)
            p.inputVolume = next((node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                                  if not node.IsA("vtkMRMLLabelMapVolumeNode")), None)
        if not p.segmentation:
            p.segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        if not p.model or p.model not in [info.name for info in self.logic.catalog.models()]:
            p.model = self.logic.catalog.defaultModelName()   # e.g. a scene saved where another was installed
        self._checkChosenDevice()

    def _checkChosenDevice(self):
        """A device this computer lacks (a scene saved elsewhere) becomes the default one,
        once the devices are known (no PyTorch import on the GUI thread: see onDevicesPoll)."""
        known = self.logic.knownDevices()
        p = self._parameterNode
        if p and known is not None and p.device not in known:
            p.device = self.logic.defaultDevice()

    def onDevicesPoll(self):
        """Until the worker process has listed the devices (a few seconds after the panel
        opens), every quarter second; then the device list is updated once."""
        self._devicesPolls += 1
        if self.logic.knownDevices() is None and self._devicesPolls < 240:
            return
        self.devicesTimer.stop()
        self._devicesPolls = 0
        self._checkChosenDevice()
        self.updateGUI()

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiObserver)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._guiObserver = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    def updateGUI(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        # the selector announces no change when a segmentation has no segment, and picks its
        # first segment when the remembered one is not in it: keep the parameter's, if it exists
        wanted = p.segmentId
        if self.ui.segmentSelector.currentNode() != p.segmentation:
            wasBlocked = self.ui.segmentSelector.blockSignals(True)
            self.ui.segmentSelector.setCurrentNode(p.segmentation)
            self.ui.segmentSelector.blockSignals(wasBlocked)
        segmentation = p.segmentation.GetSegmentation() if p.segmentation else None
        exists = bool(segmentation and wanted and segmentation.GetSegment(wanted))
        if exists and self.ui.segmentSelector.currentSegmentID() != wanted:
            self.ui.segmentSelector.setCurrentSegmentID(wanted)
        elif not exists:
            shown = self.ui.segmentSelector.currentSegmentID() or ""
            shown = shown if segmentation and shown and segmentation.GetSegment(shown) else ""
            if p.segmentId != shown:
                p.segmentId = shown    # updates the panel again, through the parameter node
                return
        index = self.ui.modelComboBox.findData(p.model)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.setCurrentIndex(index)
        known = self.logic.knownDevices()
        for i, device in enumerate(["cpu", "cuda", "mps"]):
            self.ui.deviceComboBox.model().item(i).setEnabled(device in (known or ["cpu", p.device]))
        inputs = bool(p.inputVolume and p.segmentation and exists)
        self.ui.propagateButton.enabled = ((inputs or p.allSegments and p.inputVolume and p.segmentation)
                                           and bool(p.model) and not self.refineRunner.running
                                           or self.runner.running)
        if self.runner.running or self.refineRunner.running:   # a download shares the propagation's runner
            self.ui.downloadModelButton.enabled = False
        self.ui.refineButton.enabled = inputs and not self.runner.running or self.refineRunner.running

    def onSegmentChanged(self, segmentId):
        """Slicer's selector rebuilds its list on every segment added, removed or modified (a
        paint stroke, the record written after each run): it announces "" and then its first
        segment. The user's segment stays chosen while it exists."""
        p = self._parameterNode
        if not p:
            return
        segmentation = p.segmentation.GetSegmentation() if p.segmentation else None
        if not segmentId and segmentation and segmentation.GetNumberOfSegments():
            self._listRebuilt = True            # its first segment is announced next
            return
        rebuilt, self._listRebuilt = self._listRebuilt, False
        if rebuilt and segmentation and p.segmentId and segmentation.GetSegment(p.segmentId):
            if segmentId != p.segmentId:
                self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
            return
        p.segmentId = segmentId or ""

    # -- models ------------------------------------------------------------------------
    def refreshModels(self, select=None):
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for info in self.logic.catalog.models():
            combo.addItem(info.label, info.name)
        # refilled, the list stands on its first item: back to the chosen model (an unchanged
        # parameter sends no event that would do it)
        wanted = select or (self._parameterNode.model if self._parameterNode else "")
        if combo.findData(wanted) >= 0:
            combo.setCurrentIndex(combo.findData(wanted))
        combo.blockSignals(wasBlocked)
        if select and self._parameterNode:
            self._parameterNode.model = select
        self.onModelChanged()

    def onModelChanged(self, index=None):
        name = self.ui.modelComboBox.currentData
        if not name:
            self.ui.modelCardText.plainText = "No model installed: add a checkpoint file."
            return
        if self._parameterNode and self._parameterNode.model != name:
            self._parameterNode.model = name
        info = self.logic.catalog.find(name)
        self.ui.downloadModelButton.enabled = not info.available and bool(info.url)
        try:
            self.ui.modelCardText.plainText = self.logic.catalog.cardText(info)
        except Exception as exc:  # a broken file shows why, the panel stays usable
            self.ui.modelCardText.plainText = f"{name}: {exc}"

    def onAddModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Add a FewShotSeg checkpoint", "",
                                              "FewShotSeg checkpoint (*.pt)")
        if path:
            with slicer.util.tryWithErrorDisplay("This file is not a usable FewShotSeg checkpoint.",
                                                 waitCursor=True):
                self.refreshModels(select=self.logic.catalog.addCheckpointFile(path).name)

    def onDownloadModel(self):
        info = self.logic.catalog.find(self.ui.modelComboBox.currentData)
        if self.runner.running or self.refineRunner.running:
            self.ui.statusLabel.text = "Wait for the running job to end, or cancel it, then download."
            return
        self.runner.start(lambda progress, cancel: self.logic.catalog.download(info, progress, cancel),
                          lambda path: self.refreshModels(select=info.name), self.updateGUI)

    # -- propagation ---------------------------------------------------------------------
    def onPropagateButton(self):
        p = self._parameterNode
        options = dict(model=p.model, mode=p.mode, axis=p.axis, device=p.device, intensityGate=p.intensityGate,
                       forWorker=True, walkStepMm=FAST_STEP_MM if p.fastThinSlices else 0.0,
                       outsideOtherSegments=p.outsideOtherSegments)
        if p.allSegments:   # every segment holding voxels, in one run
            prepare = lambda: self.logic.prepareSegments(p.inputVolume, p.segmentation, **options)  # noqa: E731
            send, onResult = self.logic.startSegments, self.onSegmentsResult
        else:
            prepare = lambda: self.logic.prepare(p.inputVolume, p.segmentation, p.segmentId, **options)  # noqa: E731
            send, onResult = self.logic.startPropagation, self.onResult

        def start(job):
            self.showUncertainSlices([])
            return send(job)

        self._startOrCancel(self.runner, "Cannot propagate.", prepare, start, onResult)

    def _startOrCancel(self, runner, errorTitle, prepare, start, onResult):
        """The button of a running job cancels it; otherwise prepare on the GUI thread (errors
        shown to the user, nothing changed) and compute in the worker process (``start(job)``
        sends the job and returns the handle the runner polls)."""
        if runner.running:
            runner.cancel()
            return
        from FewShotSegSlicerLib import dependencies

        with slicer.util.tryWithErrorDisplay(errorTitle, waitCursor=True):
            if not dependencies.ensureEngineDependencies(askConfirmation=True):
                return
            job = prepare()
            runner.startHandle(start(job), lambda result: onResult(job, result), self.updateGUI)
            self.updateGUI()

    def onResult(self, job, result):
        undo = self.editorUndo(job.segmentationNode)
        summary = self.logic.apply(job, result, saveStateForUndo=undo)
        self.ui.statusLabel.text = (summary.statusText() + (" (Undo in the Segment Editor)" if undo else "")
                                    + "".join("\n" + w for w in summary.warnings))
        for warning in summary.warnings:
            logging.warning("FewShotSeg: %s", warning)
        self.showUncertainSlices(summary.suggestions)  # where to look next; click one to jump there

    def onSegmentsResult(self, job, results):
        undo = self.editorUndo(job.jobs[0].segmentationNode)
        summary = self.logic.applySegments(job, results, saveStateForUndo=undo)
        self.ui.statusLabel.text = (summary.statusText() + (" (Undo in the Segment Editor)" if undo else "")
                                    + "".join("\n" + w for w in summary.warnings))
        for warning in summary.warnings:
            logging.warning("FewShotSeg: %s", warning)
        self.showUncertainSlices(summary.suggestions)

    # -- refinement ----------------------------------------------------------------------------
    def onRefineButton(self):
        p = self._parameterNode
        self._startOrCancel(self.refineRunner, "Cannot refine.",
                            lambda: self.logic.prepareRefine(p.inputVolume, p.segmentation, p.segmentId,
                                                             samples=p.refineSamples, steps=p.refineSteps,
                                                             axis=p.axis, device=p.device, forWorker=True),
                            self.logic.startRefine, self.onRefineResult)

    def onRefineResult(self, job, result):
        from FewShotSegSlicerLib.qtsupport import showUncertaintyOverlay

        undo = self.editorUndo(job.segmentationNode)
        summary = self.logic.applyRefine(job, result, saveStateForUndo=undo)
        showUncertaintyOverlay(job.volumeNode, summary.uncertaintyVolume)
        self.showUncertainSlices(summary.topSlices)
        self.ui.statusLabel.text = summary.statusText() + (" (Undo in the Segment Editor)" if undo else "")

    def showUncertainSlices(self, slices):
        self._uncertainSlices = list(slices)
        self.ui.uncertainSlicesList.clear()
        for item in self._uncertainSlices:
            self.ui.uncertainSlicesList.addItem(item.label)

    def onUncertainSliceClicked(self, item):
        from FewShotSegSlicerLib.qtsupport import jumpSlicesTo

        row = self.ui.uncertainSlicesList.row(item)
        if 0 <= row < len(self._uncertainSlices):
            item = self._uncertainSlices[row]
            jumpSlicesTo(item.position)
            if getattr(item, "segmentId", "") and self._parameterNode:
                self._parameterNode.segmentId = item.segmentId   # several segments: the one listed

    @staticmethod
    def editorUndo(segmentationNode):
        """The Segment Editor's saveStateForUndo when it edits this segmentation: Ctrl+Z works."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            if editor.segmentationNode() == segmentationNode:
                return editor.saveStateForUndo
        except AttributeError:
            pass
        return None


class FewShotSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest); the pytest suite covers slicer-core."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_widget()
        self.setUp()
        self.test_propagate_synthetic()
        self.setUp()
        self.test_editable_area_synthetic()
        self.setUp()
        self.test_refine_synthetic()

    def test_widget(self):
        widget = slicer.util.getModuleWidget("FewShotSeg")
        for name in ("inputVolumeSelector", "segmentSelector", "modelComboBox", "propagateButton",
                     "refineButton", "samplesSpinBox", "stepsSpinBox", "uncertainSlicesList", "allSegmentsCheckBox"):
            self.assertTrue(hasattr(widget.ui, name), name)

    def _blob(self, name):
        """A bright ellipsoid (24 axial slices of 4 mm) and a segmentation with an empty segment."""
        import numpy as np

        k, j, i = np.mgrid[:24, :96, :96]
        inside = ((k - 12) / 9.0) ** 2 + ((j - 48) / 28.0) ** 2 + ((i - 48) / 22.0) ** 2 <= 1
        image = (inside * 800 + np.random.default_rng(0).normal(100, 20, inside.shape)).astype(np.int16)
        volume = slicer.util.addVolumeFromArray(image, ijkToRAS=np.diag([1.5, 1.5, 4.0, 1.0]), name=name)
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        return inside, volume, seg, seg.GetSegmentation().AddEmptySegment("blob", "blob")

    def _ready(self):
        from FewShotSegSlicerLib import dependencies

        if not dependencies.torchAvailable() or not sharedLogic().catalog.defaultModelName():
            self.delayDisplay("PyTorch or the default model is missing: propagation test skipped")
            return False
        return True

    def test_propagate_synthetic(self):
        """A bright ellipsoid painted on its middle slice: that slice stays, others untouched."""
        import numpy as np

        if not self._ready():
            return
        inside, volume, seg, segId = self._blob("FewShotSegTestVolume")
        otherId = seg.GetSegmentation().AddEmptySegment("other", "other")
        painted = np.zeros_like(inside)
        painted[12] = inside[12]
        other = np.zeros_like(inside)
        other[2:5, 5:20, 5:20] = True
        slicer.util.updateSegmentBinaryLabelmapFromArray(painted.astype(np.uint8), seg, segId, volume)
        slicer.util.updateSegmentBinaryLabelmapFromArray(other.astype(np.uint8), seg, otherId, volume)
        summary = sharedLogic().propagate(volume, seg, segId, axis="axial", worker=True)  # as the GUI runs it
        result = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segId, volume) > 0
        self.assertTrue(np.array_equal(result[12], painted[12]))
        self.assertTrue(np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, otherId, volume) > 0,
                                       other))
        self.delayDisplay(summary.statusText())

    def test_editable_area_synthetic(self):
        """Editable area 'outside all segments': a segment across the ellipsoid two slices
        up is not taken, and the fill does not go on beyond it."""
        import numpy as np

        if not self._ready() or not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
            return
        inside, volume, seg, segId = self._blob("FewShotSegEditableVolume")
        painted = np.zeros_like(inside)
        painted[12] = inside[12]
        across = np.zeros_like(inside)
        across[14] = True
        slicer.util.updateSegmentBinaryLabelmapFromArray(painted.astype(np.uint8), seg, segId, volume)
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            across.astype(np.uint8), seg, seg.GetSegmentation().AddEmptySegment("across", "across"), volume)
        editor = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
        sharedLogic().propagate(volume, seg, segId, axis="axial", worker=True, editorNode=editor)
        result = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segId, volume) > 0
        self.assertTrue(result[11].any() and not result[14:].any())

    def test_refine_synthetic(self):
        """A shrunken ellipsoid refined through the widget's path: overlay shown, slices listed."""
        import numpy as np

        from FewShotSegSlicerLib import dependencies

        widget = slicer.util.getModuleWidget("FewShotSeg")
        logic = widget.logic
        try:
            logic.refinerPath()
        except Exception:
            self.delayDisplay("The shipped refiner is missing: refinement test skipped")
            return
        if not dependencies.torchAvailable():
            self.delayDisplay("PyTorch is missing: refinement test skipped")
            return
        k, j, i = np.mgrid[:24, :96, :96]
        inside = ((k - 12) / 9.0) ** 2 + ((j - 48) / 28.0) ** 2 + ((i - 48) / 22.0) ** 2 <= 1
        shrunk = ((k - 12) / 8.0) ** 2 + ((j - 48) / 24.0) ** 2 + ((i - 48) / 18.0) ** 2 <= 1
        image = (inside * 800 + np.random.default_rng(0).normal(100, 20, inside.shape)).astype(np.int16)
        volume = slicer.util.addVolumeFromArray(image, ijkToRAS=np.diag([1.5, 1.5, 4.0, 1.0]),
                                                name="FewShotSegRefineVolume")
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segId = seg.GetSegmentation().AddEmptySegment("blob", "blob")
        slicer.util.updateSegmentBinaryLabelmapFromArray(shrunk.astype(np.uint8), seg, segId, volume)
        job = logic.prepareRefine(volume, seg, segId, samples=2, steps=2, forWorker=True)
        result = logic.startRefine(job).follow()  # what the Refine button runs, minus its timer
        widget.onRefineResult(job, result)
        node = slicer.mrmlScene.GetFirstNodeByName("blob uncertainty")
        self.assertIsNotNone(node)
        self.assertEqual(slicer.util.arrayFromVolume(node).shape, inside.shape)
        self.assertEqual(widget.ui.uncertainSlicesList.count, len(widget._uncertainSlices))
        if widget._uncertainSlices:
            widget.onUncertainSliceClicked(widget.ui.uncertainSlicesList.item(0))
        self.delayDisplay(widget.ui.statusLabel.text)
