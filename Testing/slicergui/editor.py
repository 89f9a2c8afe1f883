"""The Segment Editor around a scripted effect: Slicer's C++ side of an effect, standing in.

Why: our effect is Python that Slicer's ``qSlicerSegmentEditorScriptedEffect`` (C++) loads
from its file and drives. This reproduces what our effect relies on, read against Slicer's
qSlicerSegmentEditorAbstractEffect / qSlicerSegmentEditorScriptedEffect / the editor widget:
the effect is loaded by ``setPythonSource`` (the class named after the file), registered,
and each editor works on a clone of it on a real vtkMRMLSegmentEditorNode; the call order
is the editor's (``SegmentEditor``); parameters are the node's attributes
``<effect name>.<parameter>``, an empty one counts as not set, and setting one sends
EffectParameterModified, not Modified.

Not reproduced: the editor's masking in ``modifySelectedSegmentByLabelmap`` (the labelmap
replaces the whole segment, as Set mode does where no mask applies; the overwrite mode is
applied) and its undo stack (``saveStateForUndo`` calls are counted).
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import slicer

from .pythonqt import qt


class AbstractScriptedSegmentEditorEffect:
    """``SegmentEditorEffects.AbstractScriptedSegmentEditorEffect``, the part we use."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def register(self):
        REGISTERED.append(self.scriptedEffect)

    def cleanup(self):
        pass


REGISTERED: list = []
MODIFICATION_MODE_SET = 0


class qSlicerSegmentEditorScriptedEffect:
    def __init__(self, parent=None):
        self.name, self.title, self.perSegment, self.requireSegments = "", "", False, False
        self._python = None
        self._node = None
        self._active = False
        self.undoStates = 0
        self._frame = qt.QWidget()
        self._frame.setLayout(qt.QFormLayout())

    # -- loading, as Slicer does it ------------------------------------------------------
    def setPythonSource(self, path):
        path = Path(path)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        self._python = getattr(module, path.stem)(self)

    def self(self):
        return self._python

    # -- what the effect calls -----------------------------------------------------------
    def parameterSetNode(self):
        return self._node

    def _attribute(self, name):
        return f"{self.name}.{name}"

    def commonParameterDefined(self, attribute):
        value = self._node.GetAttribute(attribute) if self._node is not None else None
        return bool(value)                   # Slicer: an empty value is not defined

    def parameterDefined(self, name):
        return self.commonParameterDefined(self._attribute(name))

    def parameter(self, name):
        for attribute in (self._attribute(name), name):   # then the editor-wide parameter
            if self.commonParameterDefined(attribute):
                return self._node.GetAttribute(attribute)
        logging.error(f"qSlicerSegmentEditorAbstractEffect::parameter: parameter {name} not found")
        return ""

    def integerParameter(self, name):
        try:
            return int(self.parameter(name))
        except ValueError:
            return 0

    def setParameter(self, name, value):
        self.setCommonParameter(self._attribute(name), value)

    def setCommonParameter(self, attribute, value):
        """As Slicer's: nothing when unchanged (or empty and not stored); the attribute set
        with Modified events off, then EffectParameterModified (deferred inside StartModify)."""
        text, old = str(value), self._node.GetAttribute(attribute)
        if (old is None and text == "") or text == old:
            return
        disabled = self._node.GetDisableModifiedEvent()
        self._node.SetDisableModifiedEvent(1)
        self._node.SetAttribute(attribute, text)
        self._node.SetDisableModifiedEvent(disabled)
        self._node.InvokeCustomModifiedEvent(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified)

    def setParameterDefault(self, name, value):
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def optionsFrame(self):
        return self._frame

    def addOptionsWidget(self, item):
        self._frame.layout().addRow(item)     # a widget or a layout, as Slicer takes both

    def addLabeledOptionsWidget(self, label, widget):
        self._frame.layout().addRow(label, widget)

    def active(self):
        return self._active

    def saveStateForUndo(self):
        self.undoStates += 1

    def referenceGeometryImage(self):
        segmentation = self._node.GetSegmentationNode().GetSegmentation()
        converter = slicer.vtkSegmentationConverter
        image = slicer.vtkOrientedImageData()
        converter.DeserializeImageGeometry(
            segmentation.GetConversionParameter(converter.GetReferenceImageGeometryParameterName()), image, False)
        return image

    def modifySelectedSegmentByLabelmap(self, labelmap, mode):
        """Set mode with no mask: the whole segment is replaced by the labelmap; then, by the
        editor's overwrite mode (default: all segments), the written voxels leave the other
        segments, as Slicer's effect does."""
        if mode != MODIFICATION_MODE_SET:
            raise NotImplementedError("only Set mode is reproduced")
        node = self._node
        segmentationNode, selected = node.GetSegmentationNode(), node.GetSelectedSegmentID()
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(labelmap, segmentationNode, selected, logic.MODE_REPLACE):
            raise RuntimeError("SetBinaryLabelmapToSegment failed")
        overwrite = node.GetOverwriteMode()
        if overwrite == slicer.vtkMRMLSegmentEditorNode.OverwriteNone:
            return
        display = segmentationNode.GetDisplayNode()
        segmentation = segmentationNode.GetSegmentation()
        written = None
        for i in range(segmentation.GetNumberOfSegments()):
            other = segmentation.GetNthSegmentID(i)
            if other == selected or (overwrite == slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments
                                     and display is not None and not display.GetSegmentVisibility(other)):
                continue
            if written is None:
                written = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, selected, self._sourceVolume()) > 0
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, other, self._sourceVolume()) > 0
            if (mask & written).any():
                slicer.util.updateSegmentBinaryLabelmapFromArray((mask & ~written).astype("uint8"), segmentationNode,
                                                                 other, self._sourceVolume())

    def _sourceVolume(self):
        node = self._node
        return node.GetSourceVolumeNode() if hasattr(node, "GetSourceVolumeNode") else node.GetMasterVolumeNode()


class SegmentEditor:
    """One Segment Editor widget with one effect: its own clone of the registered effect,
    driven in Slicer's order (qMRMLSegmentEditorWidget: an editor that has its node calls
    setMRMLDefaults before setupOptionsFrame; updateGUIFromMRML reaches the effect only
    while it is active, on EffectParameterModified; deletion calls cleanup alone)."""

    def __init__(self, registered, editorNode):
        self.effect = registered.self().clone()
        self.python = self.effect.self()
        self.effect._node = editorNode
        self.python.setMRMLDefaults()
        self.python.setupOptionsFrame()
        self._tag = editorNode.AddObserver(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified,
                                           lambda caller, event: self.updateGUIFromMRML())

    def updateGUIFromMRML(self):
        if self.effect._active:             # qSlicerSegmentEditorScriptedEffect returns early else
            self.python.updateGUIFromMRML()

    def select(self):
        self.effect._active = True          # Superclass::activate: active, then the GUI from MRML
        self.updateGUIFromMRML()
        self.python.activate()
        self.updateGUIFromMRML()            # the editor once more after activating

    def leave(self):
        self.python.deactivate()
        self.effect._active = False

    def delete(self):
        if self._tag is None:
            return
        self.python.cleanup()
        self.effect._node.RemoveObserver(self._tag)
        self._tag = None


def installModules():
    """``SegmentEditorEffects`` and ``qSlicerSegmentationsEditorEffectsPythonQt``."""
    effects = types.ModuleType("SegmentEditorEffects")
    effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    sys.modules["SegmentEditorEffects"] = effects
    wrapped = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    wrapped.qSlicerSegmentEditorScriptedEffect = qSlicerSegmentEditorScriptedEffect
    sys.modules["qSlicerSegmentationsEditorEffectsPythonQt"] = wrapped
    slicer.qSlicerSegmentEditorAbstractEffect = types.SimpleNamespace(ModificationModeSet=MODIFICATION_MODE_SET)
