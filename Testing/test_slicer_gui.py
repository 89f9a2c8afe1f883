"""The module panel and the Segment Editor effect, clicked as a user clicks them.

Why: the panels are what a Slicer user touches first, and until now no line of them ran
outside a Slicer build. Here they run on real Qt widgets (PySide6, offscreen), real MRML
(slicer-core), Slicer's own ``slicer.util`` and the real worker process, with stand-ins
for PythonQt, Slicer's C++ widgets, the parameter node wrapper and the editor's C++ side
(``Testing/slicergui``, each checked against Slicer's source; what they leave out is said
there). Slicer's main loop is reproduced: Qt events, and a wait holding the GIL between
them. Needs PySide6 (the ``test`` extra), slicer-core and ../shared/data; skips without.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "FewShotSeg"), str(ROOT), str(Path(__file__).resolve().parent)]

pytest.importorskip("PySide6", reason="PySide6 is not installed (pip install -e '.[test]')")
slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
pytest.importorskip("torch")

from test_slicer_logic import (LIVER, chaos, core, data_dir, dice, private_model_home,  # noqa: E402,F401
                               scene, sharedCore, tiny_checkpoint)

RUN_SECONDS = 300


@pytest.fixture(scope="module")
def gui():
    from slicergui import application

    app = application.install(sharedCore())
    modules = application.loadModuleFolder(ROOT / "FewShotSeg")
    yield application.Session(app, modules)
    application.uninstall()


@pytest.fixture
def panel(gui, chaos):
    from slicergui import application

    widget = slicer.modules.fewshotseg.newPanel()
    application.enterPanel(widget)
    gui.app.errors.clear()
    yield widget
    application.exitPanel(widget)
    widget.cleanup()


def segmentArray(case, segmentId):
    return slicer.util.arrayFromSegmentBinaryLabelmap(case.seg, segmentId, case.image) > 0


def shown(widget) -> bool:
    """Whether the panel shows it (the panels themselves are never put on a screen here)."""
    return not widget.isHidden()


def runUntilIdle(gui, runner):
    assert gui.app.runFor(RUN_SECONDS, lambda: not runner.running), "the job did not end"


# -- loading ---------------------------------------------------------------------------------
def test_module_loads_and_registers_its_effect_as_slicer_does(gui):
    from slicergui import editor

    assert sorted(gui.modules) == ["FewShotSeg"]     # the only top-level .py: Slicer loads each
    assert [e.self().scriptedEffect.name for e in editor.REGISTERED] == ["Few-shot propagate"]
    assert gui.app.errors == []


def test_panel_picks_the_inputs_a_user_expects(panel, chaos, scene):
    p = panel._parameterNode
    assert p.inputVolume == chaos.image and p.segmentation == chaos.seg
    assert p.segmentId == panel.ui.segmentSelector.currentSegmentID() != ""
    assert p.model == panel.logic.catalog.defaultModelName()
    assert [panel.ui.modeComboBox.itemText(i) for i in range(panel.ui.modeComboBox.count)][0] == "auto"
    assert panel.ui.propagateButton.enabled and panel.ui.propagateButton.text == "Propagate"
    # a labelmap is never taken for the image, even when it comes first in the scene
    panel._parameterNode.inputVolume = None
    scene.scene.Clear(0)
    label = scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert label is not None
    panel.initializeParameterNode()
    assert panel._parameterNode.inputVolume is None


def test_panel_propagate_then_correct_a_slice(gui, panel, chaos):
    panel._parameterNode.segmentId = chaos.liver
    panel.ui.propagateButton.click()
    assert panel.ui.propagateButton.text == "Cancel" and shown(panel.ui.progressBar)
    runUntilIdle(gui, panel.runner)
    assert panel.ui.propagateButton.text == "Propagate" and not shown(panel.ui.progressBar)
    assert panel.ui.statusLabel.text.startswith("Filled "), panel.ui.statusLabel.text
    result = segmentArray(chaos, chaos.liver)
    assert np.array_equal(result[chaos.k], chaos.painted[chaos.k])
    assert dice(result, chaos.label == LIVER) > 0.7
    listed = panel.ui.uncertainSlicesList
    assert listed.count == len(panel._uncertainSlices) > 0
    listed.itemClicked.emit(listed.item(0))          # jumps the views there
    # the user paints the truth on a far slice and clicks again: both drawn slices stay
    far = int(np.flatnonzero((chaos.label == LIVER).any((1, 2)))[-2])
    corrected = result.copy()
    corrected[far] = chaos.label[far] == LIVER
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), chaos.seg, chaos.liver, chaos.image)
    panel.ui.propagateButton.click()
    runUntilIdle(gui, panel.runner)
    again = segmentArray(chaos, chaos.liver)
    assert np.array_equal(again[far], chaos.label[far] == LIVER)
    assert np.array_equal(again[chaos.k], chaos.painted[chaos.k])
    assert "2 drawn" in panel.ui.statusLabel.text, panel.ui.statusLabel.text
    assert gui.app.errors == []


def test_panel_cancel_leaves_the_segment_as_it_was(gui, panel, chaos):
    panel._parameterNode.segmentId = chaos.liver
    before = segmentArray(chaos, chaos.liver)
    panel.ui.propagateButton.click()
    panel.ui.propagateButton.click()                 # the same button reads Cancel
    runUntilIdle(gui, panel.runner)
    assert panel.ui.statusLabel.text == "Cancelled: the segmentation was not changed."
    assert np.array_equal(segmentArray(chaos, chaos.liver), before)
    assert panel.ui.propagateButton.text == "Propagate" and gui.app.errors == []


def test_panel_bad_input_is_one_message_and_nothing_changes(gui, panel, chaos):
    empty = chaos.seg.GetSegmentation().AddEmptySegment("empty")
    panel._parameterNode.segmentId = empty
    before = segmentArray(chaos, chaos.liver)
    panel.ui.propagateButton.click()
    assert not panel.runner.running and panel.ui.propagateButton.text == "Propagate"
    # the error box's text (title, then the one line), and the exception Slicer's console prints
    assert len(gui.app.errors) == 2 and gui.app.errors[0].startswith("Cannot propagate.\n\n")
    message = gui.app.errors[0].split("\n\n", 1)[1]
    assert len(message.splitlines()) == 1 and "is empty: paint the structure" in message, message
    assert gui.app.errors[1].startswith("uncaught FewShotSegError: ")
    assert np.array_equal(segmentArray(chaos, chaos.liver), before)
    assert not segmentArray(chaos, empty).any()


def test_panel_learns_the_devices_from_the_worker(gui, panel):
    assert gui.app.runFor(RUN_SECONDS, lambda: panel.logic.knownDevices() is not None and
                          not panel.devicesTimer.isActive())
    known = panel.logic.knownDevices()
    items = panel.ui.deviceComboBox.model()
    assert [items.item(i).isEnabled() for i in range(3)] == [d in known for d in ("cpu", "cuda", "mps")]


def test_scene_closed_mid_run_writes_nothing_and_raises_nothing(gui, panel, chaos, scene):
    panel._parameterNode.segmentId = chaos.liver
    panel.ui.propagateButton.click()
    scene.scene.Clear(0)                             # File > Close scene while it runs
    runUntilIdle(gui, panel.runner)
    assert gui.app.errors == []
    assert panel.ui.uncertainSlicesList.count == 0


# -- the Segment Editor effect ---------------------------------------------------------------
@pytest.fixture
def editor(gui, chaos, scene):
    from slicergui import editor as editors

    node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    node.SetAndObserveSegmentationNode(chaos.seg)
    setSource = getattr(node, "SetAndObserveSourceVolumeNode", None) or node.SetAndObserveMasterVolumeNode
    setSource(chaos.image)
    node.SetSelectedSegmentID(chaos.liver)
    host = editors.SegmentEditor(editors.REGISTERED[0], node)
    host.select()
    gui.app.errors.clear()
    yield host
    host.delete()


def test_effect_propagates_with_one_undo_state(gui, editor, chaos):
    effect = editor.python
    assert editor.effect.parameter("Model") == effect.logic.catalog.defaultModelName()
    effect.propagateButton.click()
    runUntilIdle(gui, effect.runner)
    assert effect.statusLabel.text.startswith("Filled "), effect.statusLabel.text
    assert editor.effect.undoStates == 1
    result = segmentArray(chaos, chaos.liver)
    assert np.array_equal(result[chaos.k], chaos.painted[chaos.k])
    assert dice(result, chaos.label == LIVER) > 0.7
    assert shown(effect.nextButton) and effect.suggestionLabel.text.startswith("Look next at:")
    effect.nextButton.click()
    assert effect.suggestionLabel.text.startswith("1/")
    assert gui.app.errors == []


def test_effect_options_are_stored_in_the_editor_node(gui, editor):
    effect = editor.python
    effect.fastCheckBox.checked = True
    effect.axisComboBox.setCurrentIndex(effect.axisComboBox.findText("axial"))
    node = editor.effect.parameterSetNode()
    assert node.GetAttribute("Few-shot propagate.FastThinSlices") == "1"
    assert node.GetAttribute("Few-shot propagate.Axis") == "axial"
    assert effect.fastCheckBox.checked and effect.axisComboBox.currentText == "axial"


def test_effect_left_mid_run_still_applies_the_result(gui, editor, chaos):
    effect = editor.python
    effect.propagateButton.click()
    editor.leave()                                   # another effect chosen while it runs
    runUntilIdle(gui, effect.runner)
    assert segmentArray(chaos, chaos.liver).sum() > chaos.painted.sum()
    assert gui.app.errors == []


def test_effect_preview_is_applied_only_when_asked(gui, editor, chaos, scene):
    effect = editor.python
    effect.previewCheckBox.checked = True
    effect.propagateButton.click()
    runUntilIdle(gui, effect.runner)
    assert shown(effect.applyButton) and effect.previewNode is not None
    assert np.array_equal(segmentArray(chaos, chaos.liver), chaos.painted)
    effect.applyButton.click()
    assert segmentArray(chaos, chaos.liver).sum() > chaos.painted.sum()
    assert not shown(effect.applyButton)
    assert scene.scene.GetFirstNodeByName("FewShotSeg preview") is None
    assert gui.app.errors == []


def test_the_modules_own_self_test_passes(gui, scene):
    """FewShotSegTest, what Slicer's *Reload and Test* runs: the panel through
    getModuleWidget, propagation in the worker, the editable area, refinement's overlay."""
    test = gui.modules["FewShotSeg"].FewShotSegTest()
    test.runTest()
    widget = slicer.util.getModuleWidget("FewShotSeg")
    assert widget.ui.statusLabel.text.startswith("Refined"), widget.ui.statusLabel.text
    assert gui.app.errors == []


def test_panel_refine_overlays_the_uncertainty_and_lists_slices(gui, panel, chaos, scene):
    panel._parameterNode.segmentId = chaos.liver
    panel._parameterNode.refineSamples, panel._parameterNode.refineSteps = 2, 2
    assert panel.ui.samplesSpinBox.value == 2             # the parameter node drives the panel
    panel.ui.propagateButton.click()                      # paint, propagate, then refine
    runUntilIdle(gui, panel.runner)
    before = segmentArray(chaos, chaos.liver)
    panel.ui.refineButton.click()
    assert panel.ui.refineButton.text == "Cancel" and not panel.ui.propagateButton.enabled
    runUntilIdle(gui, panel.refineRunner)
    assert panel.ui.statusLabel.text.startswith("Refined"), panel.ui.statusLabel.text
    overlay = scene.scene.GetFirstNodeByName(chaos.seg.GetSegmentation().GetSegment(chaos.liver).GetName()
                                            + " uncertainty")
    assert overlay is not None and slicer.util.arrayFromVolume(overlay).shape == before.shape
    assert panel.ui.uncertainSlicesList.count == len(panel._uncertainSlices) > 0
    after = segmentArray(chaos, chaos.liver)
    assert np.array_equal(after[chaos.k], chaos.painted[chaos.k])   # the painted slice stays as painted
    assert gui.app.errors == []


def test_panel_adds_a_checkpoint_the_user_picks(gui, panel, tiny_checkpoint, monkeypatch):
    import qt

    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", staticmethod(lambda *args: str(tiny_checkpoint)))
    panel.ui.addModelButton.click()
    combo = panel.ui.modelComboBox
    assert panel._parameterNode.model == combo.currentData != panel.logic.catalog.defaultModelName()
    assert panel.ui.modelCardText.plainText.strip()
    assert gui.app.errors == []
    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", staticmethod(lambda *args: str(Path(__file__))))
    panel.ui.addModelButton.click()                        # not a checkpoint: one message, list unchanged
    assert gui.app.errors[0].startswith("This file is not a usable FewShotSeg checkpoint.")
    assert panel._parameterNode.model == combo.currentData


def test_panel_all_painted_segments_at_once(gui, panel, chaos):
    p = panel._parameterNode
    p.allSegments = True
    assert panel.ui.allSegmentsCheckBox.checked
    spleen = segmentArray(chaos, chaos.spleen)             # complete: every slice of it is a drawn one
    panel.ui.propagateButton.click()
    runUntilIdle(gui, panel.runner)
    assert panel.ui.statusLabel.text.strip(), "no summary shown"
    assert segmentArray(chaos, chaos.liver).sum() > chaos.painted.sum()
    drawn = spleen.any((1, 2))
    assert np.array_equal(segmentArray(chaos, chaos.spleen)[drawn], spleen[drawn])
    assert gui.app.errors == []


def propagateForRefine(gui, effect):
    """Two samples of two steps (fast), then one Propagate: the segment Refine works on."""
    effect.refineSamplesSpinBox.value, effect.refineStepsSpinBox.value = 2, 2
    effect.propagateButton.click()
    runUntilIdle(gui, effect.runner)


def test_effect_refine_after_propagate_keeps_the_drawn_slice(gui, editor, chaos):
    effect = editor.python
    propagateForRefine(gui, effect)
    effect.refineButton.click()
    runUntilIdle(gui, effect.refineRunner)
    assert effect.statusLabel.text.startswith("Refined"), effect.statusLabel.text
    assert editor.effect.undoStates == 2                   # one per run
    assert np.array_equal(segmentArray(chaos, chaos.liver)[chaos.k], chaos.painted[chaos.k])
    assert gui.app.errors == []


def test_effect_deleted_mid_run_writes_nothing_and_the_next_editor_works(gui, editor, chaos, scene):
    from slicergui import editor as editors

    effect = editor.python
    effect.propagateButton.click()
    editor.delete()                                  # the Segment Editor widget is deleted
    gui.app.runFor(3)
    assert np.array_equal(segmentArray(chaos, chaos.liver), chaos.painted)
    again = editors.SegmentEditor(editors.REGISTERED[0], editor.effect.parameterSetNode())
    again.select()
    again.python.propagateButton.click()
    runUntilIdle(gui, again.python.runner)
    assert again.python.statusLabel.text.startswith("Filled "), again.python.statusLabel.text
    again.delete()
    assert gui.app.errors == []


# -- defects found by clicking through both panels (each failed before its fix) --------------
def test_effect_preview_of_a_segment_deleted_mid_run_is_one_line_and_no_node(gui, editor, chaos, scene):
    effect = editor.python
    effect.previewCheckBox.checked = True
    effect.propagateButton.click()
    chaos.seg.GetSegmentation().RemoveSegment(chaos.liver)
    runUntilIdle(gui, effect.runner)
    assert gui.app.errors[0].endswith("the segment was deleted while propagating; nothing was written")
    assert scene.scene.GetFirstNodeByName("FewShotSeg preview") is None
    assert effect.statusLabel.text.startswith("Not written: the segment was deleted")


def test_panel_status_says_a_result_was_not_written(gui, panel, chaos):
    panel._parameterNode.segmentId = chaos.liver
    panel.ui.propagateButton.click()
    chaos.seg.GetSegmentation().RemoveSegment(chaos.liver)
    runUntilIdle(gui, panel.runner)
    assert panel.ui.statusLabel.text == "Not written: the segment was deleted while propagating; nothing was written"


def test_refine_before_any_propagate_says_the_painting_was_redrawn(gui, panel, chaos):
    p = panel._parameterNode
    p.segmentId, p.refineSamples, p.refineSteps = chaos.liver, 2, 2
    panel.ui.refineButton.click()
    runUntilIdle(gui, panel.refineRunner)
    assert "Nothing propagated yet, so the painted slices were redrawn too" in panel.ui.statusLabel.text
    assert gui.app.errors == []


def test_effect_refine_result_goes_to_its_segment_when_another_is_selected(gui, editor, chaos):
    effect = editor.python
    propagateForRefine(gui, effect)
    before, spleen = segmentArray(chaos, chaos.liver), segmentArray(chaos, chaos.spleen)
    effect.refineButton.click()
    editor.leave()
    editor.effect.parameterSetNode().SetSelectedSegmentID(chaos.spleen)
    runUntilIdle(gui, effect.refineRunner)
    assert gui.app.errors == [] and effect.statusLabel.text.startswith("Refined")
    assert not np.array_equal(segmentArray(chaos, chaos.liver), before)
    assert np.array_equal(segmentArray(chaos, chaos.spleen), spleen)


def test_effect_refused_apply_drops_the_stale_preview(gui, editor, chaos, scene):
    effect = editor.python
    effect.previewCheckBox.checked = True
    effect.propagateButton.click()
    runUntilIdle(gui, effect.runner)
    edited = chaos.painted.copy()
    edited[chaos.k + 3] = chaos.label[chaos.k + 3] == LIVER
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), chaos.seg, chaos.liver, chaos.image)
    effect.applyButton.click()
    assert np.array_equal(segmentArray(chaos, chaos.liver), edited)
    assert effect.statusLabel.text.startswith("Preview not applied: the segment was edited")
    assert not shown(effect.applyButton) and scene.scene.GetFirstNodeByName("FewShotSeg preview") is None


def test_panel_adding_the_same_checkpoint_twice_keeps_it_chosen(gui, panel, tiny_checkpoint, monkeypatch):
    import qt

    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", staticmethod(lambda *args: str(tiny_checkpoint)))
    panel.ui.addModelButton.click()
    panel.ui.addModelButton.click()
    assert gui.app.errors == []
    assert panel._parameterNode.model == tiny_checkpoint.stem == panel.ui.modelComboBox.currentData


def test_panel_cancel_clicked_after_the_job_ended_but_before_it_was_applied(gui, panel, chaos):
    panel._parameterNode.segmentId = chaos.liver
    before = segmentArray(chaos, chaos.liver)
    panel.ui.propagateButton.click()
    panel.runner.timer.stop()                        # the job ends between two polls:
    time.sleep(8)                                    # its result waits in the pipe, unread
    panel.ui.propagateButton.click()                 # Cancel, before the next poll applies it
    panel.runner.timer.start()
    runUntilIdle(gui, panel.runner)
    assert panel.ui.statusLabel.text == "Cancelled: the segmentation was not changed."
    assert np.array_equal(segmentArray(chaos, chaos.liver), before)


def test_panel_keeps_its_segment_when_the_segment_list_is_rebuilt(gui, panel, chaos):
    """Slicer's segment selector rebuilds its list, selecting the first segment, on every
    segment added, removed or modified (a stroke, the tag written after each run): the panel
    must stay on the segment the user chose."""
    s = chaos.seg.GetSegmentation()
    kidney = s.AddEmptySegment("kidney", "kidney")
    label = chaos.label == 2
    k = int(np.argmax(label.sum((1, 2))))
    painted = np.zeros_like(label)
    painted[k] = label[k]
    panel._parameterNode.segmentId = kidney
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted.astype(np.uint8), chaos.seg, kidney, chaos.image)
    assert panel._parameterNode.segmentId == kidney == panel.ui.segmentSelector.currentSegmentID()
    panel.ui.propagateButton.click()
    runUntilIdle(gui, panel.runner)
    assert panel.ui.statusLabel.text.startswith("Filled "), panel.ui.statusLabel.text
    assert panel._parameterNode.segmentId == kidney == panel.ui.segmentSelector.currentSegmentID()
    s.AddEmptySegment("another", "another")         # the user adds a segment in the Segment Editor
    assert panel._parameterNode.segmentId == kidney == panel.ui.segmentSelector.currentSegmentID()
    s.RemoveSegment(kidney)                          # the chosen one deleted: the list's first is taken
    assert panel._parameterNode.segmentId == panel.ui.segmentSelector.currentSegmentID() == chaos.liver
    assert gui.app.errors == []


def test_panel_made_without_a_parent_sets_itself_up_once(gui, chaos):
    """As in Slicer's Python console: FewShotSegWidget() makes its own parent and runs setup()."""
    widget = gui.modules["FewShotSeg"].FewShotSegWidget()
    assert widget.logic is not None and widget._parameterNode is not None
    assert widget.ui.propagateButton.text == "Propagate"
    widget.cleanup()


@pytest.mark.parametrize("overwrite", ["OverwriteAllSegments", "OverwriteNone"])
def test_effect_result_follows_the_editors_overwrite_setting(gui, editor, chaos, overwrite):
    node = editor.effect.parameterSetNode()
    node.SetOverwriteMode(getattr(slicer.vtkMRMLSegmentEditorNode, overwrite))
    spleen = segmentArray(chaos, chaos.spleen)
    # the spleen segment also covers a band of the liver next to the painted slice
    grown = spleen.copy()
    band = chaos.label == LIVER
    band[:chaos.k + 1] = False
    grown |= band
    slicer.util.updateSegmentBinaryLabelmapFromArray(grown.astype(np.uint8), chaos.seg, chaos.spleen, chaos.image)
    editor.python.propagateButton.click()
    runUntilIdle(gui, editor.python.runner)
    liver, after = segmentArray(chaos, chaos.liver), segmentArray(chaos, chaos.spleen)
    assert liver.sum() > chaos.painted.sum()
    if overwrite == "OverwriteNone":
        assert np.array_equal(after, grown)
    else:
        assert not (liver & after).any() and np.array_equal(after, grown & ~liver)


def test_effect_a_stored_device_this_computer_lacks_becomes_the_one_shown(gui, editor, chaos):
    node = editor.effect.parameterSetNode()
    editor.leave()
    node.SetAttribute("Few-shot propagate.Device", "cuda")     # a scene saved on a GPU machine
    editor.select()
    effect = editor.python
    assert gui.app.runFor(RUN_SECONDS, lambda: effect.logic.knownDevices() is not None)
    gui.app.runFor(1)
    if "cuda" in effect.logic.knownDevices():
        pytest.skip("this computer has a CUDA device")
    assert node.GetAttribute("Few-shot propagate.Device") == effect.deviceComboBox.currentText == "cpu"
    effect.propagateButton.click()
    runUntilIdle(gui, effect.runner)
    assert gui.app.errors == [] and effect.statusLabel.text.startswith("Filled ")


def test_a_stored_model_no_longer_installed_becomes_the_default(gui, editor, chaos):
    node = editor.effect.parameterSetNode()
    editor.leave()
    node.SetAttribute("Few-shot propagate.Model", "some-removed-model")
    editor.select()
    effect = editor.python
    assert node.GetAttribute("Few-shot propagate.Model") == effect.modelComboBox.currentText \
        == effect.logic.catalog.defaultModelName()
    from slicergui import application
    widget = slicer.modules.fewshotseg.newPanel()
    widget.logic.getParameterNode().SetParameter("model", "some-removed-model")
    application.enterPanel(widget)
    try:
        assert widget._parameterNode.model == widget.ui.modelComboBox.currentData \
            == widget.logic.catalog.defaultModelName()
    finally:
        application.exitPanel(widget)
        widget.cleanup()
    assert gui.app.errors == []


def test_effect_result_written_over_another_segment_keeps_its_record_right(gui, editor, chaos):
    """With the editor's default 'Overwrite all', B's result takes voxels of A: A's record is
    brought up to date, so those slices do not count as drawn by the user at A's next run."""
    node = editor.effect.parameterSetNode()
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    s = chaos.seg.GetSegmentation()
    mid = int(np.median(np.flatnonzero(chaos.painted[chaos.k].any(1))))
    a = chaos.painted.copy()
    a[:, mid:, :] = False                            # A and B split the painted liver slice
    b = chaos.painted.copy()
    b[:, :mid, :] = False
    slicer.util.updateSegmentBinaryLabelmapFromArray(a.astype(np.uint8), chaos.seg, chaos.liver, chaos.image)
    bId = s.AddEmptySegment("B", "B")
    slicer.util.updateSegmentBinaryLabelmapFromArray(b.astype(np.uint8), chaos.seg, bId, chaos.image)
    effect = editor.python
    node.SetSelectedSegmentID(chaos.liver)
    effect.propagateButton.click()
    runUntilIdle(gui, effect.runner)
    assert effect.logic.rememberedSlices(chaos.image, chaos.seg, chaos.liver)[1] == [chaos.k]
    node.SetSelectedSegmentID(bId)
    effect.propagateButton.click()
    runUntilIdle(gui, effect.runner)
    assert (segmentArray(chaos, chaos.liver) != a).any()   # B did take voxels of A
    assert effect.logic.rememberedSlices(chaos.image, chaos.seg, chaos.liver)[1] == [chaos.k]
    assert gui.app.errors == []
