"""Segment Editor effect "Few-shot propagate": the painted slices of the selected segment
are the support; one click fills the rest of the structure into the same segment.

Why an effect besides the module panel: users paint in the Segment Editor, and the
editor's masking (editable area, overwrite mode) and undo must apply as for every other
effect. So the result goes through modifySelectedSegmentByLabelmap (Set mode) after one
saveStateForUndo(); the work itself is the shared FewShotSegLogic's (one per Slicer
session, shared with the module panel), in its worker process. The labelmap is built on
the source volume's own grid, so painting in any slice view works. The slices the user
drew or erased are kept; Propagate after a correction refills the others. After each run
the engine's suggestions (where the result is most likely wrong) are listed and Next
jumps the slice views there. Refine redraws the selected segment with the diffusion
refiner the same way (one undo state) and lays its uncertainty volume over the image.

Leaving the effect (Slicer calls deactivate() whenever another effect or module is
chosen) does not cancel a running job: its result is applied when it arrives.
"""
import logging
import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from FewShotSegLib.errors import FewShotSegError
from FewShotSegSlicerLib import dependencies, geometry, userslices
from FewShotSegSlicerLib.logic import AXES, FAST_STEP_MM, MODES, sharedLogic
from FewShotSegSlicerLib.qtsupport import SuggestionList, TaskRunner, showUncertaintyOverlay

PREVIEW_NAME = "FewShotSeg preview"


class SegmentEditorFewShotPropagateEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Few-shot propagate"
        try:
            scriptedEffect.title = "Few-shot propagate"
        except AttributeError:  # Slicer before the translatable effect titles
            pass
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None
        self.previewNode = None
        self.pending = None  # (job, result) shown as preview, not yet applied

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorFewShotPropagateEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return ("<html>Paint the selected segment on one (or a few) slices, then click "
                "<b>Propagate</b>: a few-shot model fills the other slices of the same segment. "
                "<b>Refine</b> redraws the selected segment with the refiner (K samples, a few steps) "
                "and shows its uncertainty as a coloured overlay; the slices you painted for the last Propagate "
                "stay as they are. "
                "To correct, paint or erase any slice and click <b>Propagate</b> again: the slices you "
                "drew stay exactly, a slice you erased to empty is where the structure ends, the rest is "
                "refilled. <b>Next</b> jumps to the slices most worth checking. "
                "Masking and overwrite settings apply; the fill also stays inside the <i>Editable area</i> "
                "while it is computed (e.g. 'Outside all segments': it does not cross the segments you have "
                "drawn). Undo restores the previous state.</html>")

    # -- options panel --------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.logic = sharedLogic()
        self.suggestions = SuggestionList()
        self.modelComboBox = qt.QComboBox()
        self.modeComboBox = qt.QComboBox()
        self.modeComboBox.addItems(list(MODES))
        self.axisComboBox = qt.QComboBox()
        self.axisComboBox.addItems(list(AXES))
        self.deviceComboBox = qt.QComboBox()
        self.deviceComboBox.addItem("cpu")  # cuda / mps added on activate(): no torch import here
        self.previewCheckBox = qt.QCheckBox("Preview before applying")
        self.allCheckBox = qt.QCheckBox("All painted segments at once")
        self.allCheckBox.toolTip = ("Propagate every segment that holds voxels in one run, each from the slices "
                                    "drawn in it; where two results meet, the voxels go to the segment drawn "
                                    "nearest. Applied without a preview")
        self.gateCheckBox = qt.QCheckBox("Intensity gate")
        self.gateCheckBox.toolTip = ("Drop filled voxels whose intensity lies far from that of the structure's "
                                     "confident core (leaks onto fat, muscle or bowel). Few-shot models and "
                                     "registration only: the step network draws its own edges")
        self.fastCheckBox = qt.QCheckBox("Faster across thin slices")
        self.fastCheckBox.toolTip = ("Walks step over slices closer than 3 mm and fill the ones between: about "
                                     "twice as fast in a plane of thin slices; a structure that moves fast from "
                                     "slice to slice (a thin vessel crossing the plane) can be lost")
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelComboBox)
        self.scriptedEffect.addLabeledOptionsWidget("Mode:", self.modeComboBox)
        self.scriptedEffect.addLabeledOptionsWidget("Axis:", self.axisComboBox)
        self.scriptedEffect.addLabeledOptionsWidget("Device:", self.deviceComboBox)
        self.scriptedEffect.addOptionsWidget(self.gateCheckBox)
        self.scriptedEffect.addOptionsWidget(self.fastCheckBox)
        self.scriptedEffect.addOptionsWidget(self.allCheckBox)
        self.scriptedEffect.addOptionsWidget(self.previewCheckBox)

        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.objectName = self.__class__.__name__ + "Propagate"
        self.progressBar = qt.QProgressBar()
        self.statusLabel = qt.QLabel("Paint one slice of the selected segment, then click Propagate.")
        self.statusLabel.wordWrap = True
        self.applyButton = qt.QPushButton("Apply preview")
        self.discardButton = qt.QPushButton("Discard preview")
        previewButtons = qt.QHBoxLayout()
        previewButtons.addWidget(self.applyButton)
        previewButtons.addWidget(self.discardButton)
        self.suggestionLabel = qt.QLabel("")
        self.suggestionLabel.wordWrap = True
        self.nextButton = qt.QPushButton("Next")
        self.nextButton.objectName = self.__class__.__name__ + "Next"
        self.nextButton.toolTip = "Jump the slice views to the next slice worth checking"
        lookRow = qt.QHBoxLayout()
        lookRow.addWidget(self.suggestionLabel, 1)
        lookRow.addWidget(self.nextButton)
        for widget in (self.propagateButton, self.progressBar, self.statusLabel):
            self.scriptedEffect.addOptionsWidget(widget)
        self.scriptedEffect.addOptionsWidget(lookRow)
        self.scriptedEffect.addOptionsWidget(previewButtons)
        self.runner = TaskRunner(self.propagateButton, self.progressBar, self.statusLabel)

        self.refineButton = qt.QPushButton("Refine")
        self.refineButton.objectName = self.__class__.__name__ + "Refine"
        self.refineButton.toolTip = "Redraw the selected segment with the refiner and show its uncertainty."
        self.refineSamplesSpinBox = qt.QSpinBox()
        self.refineSamplesSpinBox.setRange(1, 32)
        self.refineSamplesSpinBox.toolTip = "Refiner samples (K): their spread is the uncertainty"
        self.refineStepsSpinBox = qt.QSpinBox()
        self.refineStepsSpinBox.setRange(1, 50)
        self.refineStepsSpinBox.toolTip = "Denoising steps per sample"
        refineRow = qt.QHBoxLayout()
        refineRow.addWidget(self.refineButton, 1)
        refineRow.addWidget(qt.QLabel("K:"))
        refineRow.addWidget(self.refineSamplesSpinBox)
        refineRow.addWidget(qt.QLabel("Steps:"))
        refineRow.addWidget(self.refineStepsSpinBox)
        self.scriptedEffect.addOptionsWidget(refineRow)
        self.refineRunner = TaskRunner(self.refineButton, self.progressBar, self.statusLabel, startText="Refine")

        self.refreshModels()
        for combo in (self.modelComboBox, self.modeComboBox, self.axisComboBox, self.deviceComboBox):
            combo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        for checkBox in (self.previewCheckBox, self.gateCheckBox, self.fastCheckBox, self.allCheckBox):
            checkBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        for spinBox in (self.refineSamplesSpinBox, self.refineStepsSpinBox):
            spinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.refineButton.connect("clicked()", self.onRefine)
        self.applyButton.connect("clicked()", self.onApplyPreview)
        self.discardButton.connect("clicked()", self.discardPreview)
        self.nextButton.connect("clicked()", self.onNext)
        self.showSuggestions([])
        self.updatePreviewButtons()
        # an effect hears of no scene close: a job running then must not write into the next scene
        self._closeTag = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self._onSceneStartClose)

    def _onSceneStartClose(self, caller=None, event=None):
        for runner in (self.runner, self.refineRunner):
            runner.stop()
        self.discardPreview()
        self.showSuggestions([])

    def refreshModels(self):
        """The installed models now (one added or downloaded in the module panel shows up
        the next time the effect is chosen)."""
        current = self.modelComboBox.currentText
        wasBlocked = self.modelComboBox.blockSignals(True)
        self.modelComboBox.clear()
        for info in self.logic.catalog.models():
            if info.available:  # downloads happen in the module panel
                self.modelComboBox.addItem(info.name)
        index = self.modelComboBox.findText(current)
        if index >= 0:
            self.modelComboBox.setCurrentIndex(index)
        self.modelComboBox.blockSignals(wasBlocked)

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Model", sharedLogic().catalog.defaultModelName())
        self.scriptedEffect.setParameterDefault("Mode", "auto")
        self.scriptedEffect.setParameterDefault("Axis", "auto")
        self.scriptedEffect.setParameterDefault("Device", "cpu")
        self.scriptedEffect.setParameterDefault("Preview", 0)
        self.scriptedEffect.setParameterDefault("IntensityGate", 1)
        self.scriptedEffect.setParameterDefault("FastThinSlices", 0)
        self.scriptedEffect.setParameterDefault("AllSegments", 0)
        self.scriptedEffect.setParameterDefault("RefineSamples", 4)
        self.scriptedEffect.setParameterDefault("RefineSteps", 4)

    def _text(self, name: str) -> str:
        """A string parameter, "" when not stored: Slicer stores no empty value (the model
        is "" until one is installed) and logs an error for every read of a missing one."""
        return self.scriptedEffect.parameter(name) if self.scriptedEffect.parameterDefined(name) else ""

    def updateGUIFromMRML(self):
        pairs = ((self.modelComboBox, "Model"), (self.modeComboBox, "Mode"),
                 (self.axisComboBox, "Axis"), (self.deviceComboBox, "Device"))
        for combo, name in pairs:
            wasBlocked = combo.blockSignals(True)
            index = combo.findText(self._text(name))
            combo.setCurrentIndex(max(index, 0))
            combo.blockSignals(wasBlocked)
        for checkBox, name in ((self.previewCheckBox, "Preview"), (self.gateCheckBox, "IntensityGate"),
                               (self.fastCheckBox, "FastThinSlices"), (self.allCheckBox, "AllSegments")):
            wasBlocked = checkBox.blockSignals(True)
            checkBox.checked = self.scriptedEffect.integerParameter(name) != 0
            checkBox.blockSignals(wasBlocked)
        for spinBox, name in ((self.refineSamplesSpinBox, "RefineSamples"), (self.refineStepsSpinBox, "RefineSteps")):
            wasBlocked = spinBox.blockSignals(True)
            spinBox.value = self.scriptedEffect.integerParameter(name)
            spinBox.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self, *args):
        # one modified event for all: each one refreshes every widget from the stored values
        # (updateGUIFromMRML), which would undo the change before the next line stored it
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            return
        with slicer.util.NodeModify(node):
            self._storeParameters()

    def _storeParameters(self):
        self.scriptedEffect.setParameter("Model", self.modelComboBox.currentText)
        self.scriptedEffect.setParameter("Mode", self.modeComboBox.currentText)
        self.scriptedEffect.setParameter("Axis", self.axisComboBox.currentText)
        self.scriptedEffect.setParameter("Device", self.deviceComboBox.currentText)
        self.scriptedEffect.setParameter("Preview", 1 if self.previewCheckBox.checked else 0)
        self.scriptedEffect.setParameter("IntensityGate", 1 if self.gateCheckBox.checked else 0)
        self.scriptedEffect.setParameter("FastThinSlices", 1 if self.fastCheckBox.checked else 0)
        self.scriptedEffect.setParameter("AllSegments", 1 if self.allCheckBox.checked else 0)
        self.scriptedEffect.setParameter("RefineSamples", self.refineSamplesSpinBox.value)
        self.scriptedEffect.setParameter("RefineSteps", self.refineStepsSpinBox.value)

    def activate(self):
        """Refresh the model list; start the worker and load the model while the user
        paints; list the GPU devices once the worker has (no PyTorch import on the GUI thread)."""
        self.refreshModels()
        self._checkStoredChoices()
        self.updateGUIFromMRML()
        if dependencies.torchAvailable() and not dependencies.missingPackages():
            self.logic.warmUp(self._text("Model") or None,
                              self.scriptedEffect.parameter("Device") or "cpu")
        if not getattr(self, "_devicesPolling", False):   # one chain of polls, however often activated
            self._devicesPolls = 0
            self.onDevicesPoll()

    def _checkStoredChoices(self):
        """A scene saved elsewhere may name a model not installed here or a device this
        computer lacks: the stored value becomes the default, so what is shown is what runs."""
        if self.scriptedEffect.parameterSetNode() is None:
            return
        model = self._text("Model")
        if model and self.modelComboBox.findText(model) < 0:
            self.scriptedEffect.setParameter("Model", self.logic.catalog.defaultModelName())
        known = self.logic.knownDevices()
        if known is not None and self._text("Device") not in known:
            self.scriptedEffect.setParameter("Device", self.logic.defaultDevice())

    def onDevicesPoll(self):
        """Adds cuda / mps to the device list once they are known; until then (the worker
        imports PyTorch, seconds) asks again every quarter second, for at most a minute."""
        if self.logic is None or getattr(self, "_cleanedUp", False):   # the editor was deleted meanwhile
            return
        known = self.logic.knownDevices()
        self._devicesPolling = known is None and self._devicesPolls < 240
        if known is None:
            self._devicesPolls += 1
            if self._devicesPolling:
                qt.QTimer.singleShot(250, self.onDevicesPoll)
            return
        if self.deviceComboBox.count == 1 and len(known) > 1:
            wasBlocked = self.deviceComboBox.blockSignals(True)
            for device in known[1:]:
                self.deviceComboBox.addItem(device)
            self.deviceComboBox.blockSignals(wasBlocked)
        self._checkStoredChoices()
        self.updateGUIFromMRML()

    def deactivate(self):
        """Another effect or module was chosen: a running job goes on and its result is
        applied when it arrives (only a shown preview is dropped)."""
        self.discardPreview()

    def cleanup(self):
        """The editor widget is being deleted (Slicer calls this first): stop polling, so no
        timer fires at deleted widgets; a running job is cancelled and its result dropped."""
        self._cleanedUp = True
        for runner in (getattr(self, "runner", None), getattr(self, "refineRunner", None)):
            if runner is not None:
                runner.stop()
                runner.timer.stop()
        if getattr(self, "_closeTag", None) is not None:
            slicer.mrmlScene.RemoveObserver(self._closeTag)
            self._closeTag = None
        self.discardPreview()

    # -- propagation ----------------------------------------------------------------------
    def _inputs(self):
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            raise FewShotSegError("the Segment Editor has no segmentation now; nothing was written")
        volume = node.GetSourceVolumeNode() if hasattr(node, "GetSourceVolumeNode") else node.GetMasterVolumeNode()
        return volume, node.GetSegmentationNode(), node.GetSelectedSegmentID()

    def onPropagate(self):
        if self.runner.running:
            self.runner.cancel()
            return
        if self.refineRunner.running:
            self.statusLabel.text = "A refinement is running: wait for it or cancel it."
            return
        self.discardPreview()
        with slicer.util.tryWithErrorDisplay("Cannot propagate.", waitCursor=True):
            if not dependencies.ensureEngineDependencies(askConfirmation=True):
                return
            volume, segmentation, segmentId = self._inputs()
            p = self._text
            options = dict(model=p("Model") or None, mode=p("Mode"), axis=p("Axis"), device=p("Device"),
                           intensityGate=self.scriptedEffect.integerParameter("IntensityGate") != 0,
                           forWorker=True, walkStepMm=FAST_STEP_MM
                           if self.scriptedEffect.integerParameter("FastThinSlices") else 0.0,
                           editorNode=self.scriptedEffect.parameterSetNode())
            self.showSuggestions([])
            if self.scriptedEffect.integerParameter("AllSegments"):
                job = self.logic.prepareSegments(volume, segmentation, **options)
                self.runner.startHandle(self.logic.startSegments(job),
                                        lambda results: self.applySegmentsResult(job, results))
                return
            job = self.logic.prepare(volume, segmentation, segmentId, **options)
            self.runner.startHandle(self.logic.startPropagation(job), lambda result: self.onResult(job, result))

    def onResult(self, job, result):
        # a preview needs this effect's panel (its Apply and Discard buttons): once the user
        # has left the effect the result is applied, as the docstring at the top says
        active = self.scriptedEffect.active() if hasattr(self.scriptedEffect, "active") else True
        if self.scriptedEffect.integerParameter("Preview") and active:
            self.showPreview(job, result)
        else:
            self.applyResult(job, result)

    def applyResult(self, job, result):
        """One undo state, then Set mode through the editor (masking and overwrite apply).
        If another segment was selected meanwhile, the job's own segment is written directly."""
        if self._inputs()[1:] == (job.segmentationNode, job.segmentId):
            self.logic.checkUnchanged(job)
            mask = self.logic.finalMask(job, result)
            self.writeSelectedSegment(self.logic.resultAsOrientedImage(job, result,
                                                                       self.scriptedEffect.parameterSetNode()),
                                      mask, job.axisIndex)
            self.logic.rememberPainted(job)  # read back: masking may have changed what was written
            summary = self.logic.summarize(job, result, mask, 0.0)
        else:   # the editor's undo covers the segmentation it shows: only then can it undo this
            summary = self.logic.apply(job, result, saveStateForUndo=self._undoFor(job.segmentationNode))
        self.statusLabel.text = summary.statusText() + "".join("\n" + w for w in summary.warnings)
        for warning in summary.warnings:
            logging.warning("FewShotSeg: %s", warning)
        self.showSuggestions(summary.suggestions)

    def applySegmentsResult(self, job, results):
        """Every painted segment at once: one undo state, the editor's masking when it masks."""
        node = self.scriptedEffect.parameterSetNode()
        summary = self.logic.applySegments(job, results, saveStateForUndo=self._undoFor(job.jobs[0].segmentationNode),
                                           editorNode=node if geometry.editorMasks(node) else None)
        self.statusLabel.text = summary.statusText() + "".join("\n" + w for w in summary.warnings)
        for warning in summary.warnings:
            logging.warning("FewShotSeg: %s", warning)
        self.showSuggestions(summary.suggestions)

    def _undoFor(self, segmentationNode):
        """The editor's saveStateForUndo when the editor shows ``segmentationNode``, else None."""
        node = self.scriptedEffect.parameterSetNode()
        shown = node.GetSegmentationNode() if node is not None else None
        return self.scriptedEffect.saveStateForUndo if shown == segmentationNode else None

    def showSuggestions(self, items):
        self.suggestions.set(items)
        self.suggestionLabel.text = self.suggestions.text()
        self.suggestionLabel.visible = bool(items)
        self.nextButton.visible = bool(items)

    def onNext(self):
        item = self.suggestions.next()
        node = self.scriptedEffect.parameterSetNode()
        if item is not None and getattr(item, "segmentId", "") and node is not None:
            node.SetSelectedSegmentID(item.segmentId)   # the segment to correct there, ready to paint
        if item is not None:
            self.suggestionLabel.text = f"{self.suggestions.index + 1}/{len(self.suggestions.items)}: {item.label}"

    def writeSelectedSegment(self, modifier, mask=None, axisIndex=None):
        """The only place the effect changes a segment: one undo state, then Set mode.

        The editor's overwrite setting may take the written voxels (``mask``, volume array
        order) from other segments: their records of what the user drew are brought up to
        date, else the slices it changed would count as drawn at their next Propagate (a
        slice the user edited there since, where this result has no voxel, still counts)."""
        from FewShotSegLib.postprocessing import bounding_box   # a job ran: the engine's packages are there

        node = self.scriptedEffect.parameterSetNode()
        segmentation, selected = node.GetSegmentationNode(), node.GetSelectedSegmentID()
        segments, volume = segmentation.GetSegmentation(), self._inputs()[0]
        grid, box = userslices.gridFingerprint(volume), None if mask is None else bounding_box(mask)
        overlapped = {}     # recorded segments holding voxels the result takes (read in its box only)
        if box is not None and node.GetOverwriteMode() != slicer.vtkMRMLSegmentEditorNode.OverwriteNone:
            for sid in (segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())):
                record = userslices.read(segmentation, sid) if sid != selected else None
                if (record is not None and record.grid == grid and record.axis == axisIndex
                        and (geometry.segmentToArray(segmentation, sid, volume, box) & mask[box]).any()):
                    overlapped[sid] = record
        modifier = geometry.onReferenceGrid(modifier, self.scriptedEffect.referenceGeometryImage())
        self.scriptedEffect.saveStateForUndo()
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            modifier, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        written = set(userslices.nonEmptySlices(mask, axisIndex)) if overlapped else set()
        for sid, record in overlapped.items():
            now = geometry.segmentToArray(segmentation, sid, volume)
            users = userslices.classify(now, record, axisIndex, grid).user
            self.logic.recordWritten(volume, segmentation, sid, now, axisIndex,
                                     [i for i in users if i in record.user or i not in written])

    # -- refinement --------------------------------------------------------------------------
    def onRefine(self):
        if self.refineRunner.running:
            self.refineRunner.cancel()
            return
        if self.runner.running:
            self.statusLabel.text = "A propagation is running: wait for it or cancel it."
            return
        self.discardPreview()
        with slicer.util.tryWithErrorDisplay("Cannot refine.", waitCursor=True):
            if not dependencies.ensureEngineDependencies(askConfirmation=True):
                return
            volume, segmentation, segmentId = self._inputs()
            p = self.scriptedEffect
            job = self.logic.prepareRefine(volume, segmentation, segmentId, samples=p.integerParameter("RefineSamples"),
                                           steps=p.integerParameter("RefineSteps"), axis=p.parameter("Axis"),
                                           device=p.parameter("Device"), forWorker=True)
            self.refineRunner.startHandle(self.logic.startRefine(job),
                                          lambda result: self.applyRefineResult(job, result))

    def applyRefineResult(self, job, result):
        """Through the editor (its masking and undo) while it shows the job's segment; if
        another segment was selected meanwhile, into the job's own segment, as Propagate does."""
        if self._inputs()[1:] == (job.segmentationNode, job.segmentId):
            write = lambda mask: self.writeSelectedSegment(  # noqa: E731
                geometry.arrayToOrientedImage(mask, job.volumeNode, job.segmentationNode,
                                              crop=not geometry.editorMasks(self.scriptedEffect.parameterSetNode())),
                mask, job.axisIndex)
            summary = self.logic.applyRefine(job, result, write=write)
        else:
            summary = self.logic.applyRefine(job, result, saveStateForUndo=self._undoFor(job.segmentationNode))
        showUncertaintyOverlay(job.volumeNode, summary.uncertaintyVolume)
        hint = " (Next jumps there)" if summary.topSlices else ""
        self.statusLabel.text = summary.statusText() + hint
        self.showSuggestions(summary.topSlices)

    # -- preview ----------------------------------------------------------------------------
    def showPreview(self, job, result):
        self.logic.checkUnchanged(job)   # a deleted or edited input: the one line, and no preview node
        scene = job.volumeNode.GetScene()
        self.previewNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NAME)
        self.previewNode.SetHideFromEditors(True)
        self.previewNode.CreateDefaultDisplayNodes()
        self.previewNode.SetReferenceImageGeometryParameterFromVolumeNode(job.volumeNode)
        source = job.segmentationNode.GetSegmentation().GetSegment(job.segmentId)
        previewId = self.previewNode.GetSegmentation().AddEmptySegment("preview", "preview", source.GetColor())
        geometry.writeSegment(self.previewNode, previewId, self.logic.finalMask(job, result), job.volumeNode)
        display = self.previewNode.GetDisplayNode()
        display.SetOpacity2DFill(0.35)
        display.SetOpacity2DOutline(1.0)
        self.pending = (job, result)
        self.statusLabel.text = f"Preview: {result.slices_done} slices computed. Apply or discard."
        self.updatePreviewButtons()

    def onApplyPreview(self):
        if self.pending is None:
            return
        job, result = self.pending
        try:
            with slicer.util.tryWithErrorDisplay("Could not apply the preview.", waitCursor=True):
                self.applyResult(job, result)
        except FewShotSegError as exc:   # shown already; the stale preview must not stay on screen
            self.statusLabel.text = f"Preview not applied: {exc}"
        finally:
            self.discardPreview()

    def discardPreview(self):
        if self.previewNode is not None and self.previewNode.GetScene() is not None:
            self.previewNode.GetScene().RemoveNode(self.previewNode)
        self.previewNode, self.pending = None, None
        if hasattr(self, "applyButton"):
            self.updatePreviewButtons()

    def updatePreviewButtons(self):
        self.applyButton.visible = self.pending is not None
        self.discardButton.visible = self.pending is not None
