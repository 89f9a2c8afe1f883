"""The Segment Editor around a scripted effect: Slicer's C++ side of an effect, standing in.

Why: our effect is Python that Slicer's ``qSlicerSegmentEditorScriptedEffect`` (C++) loads
from its file and drives. This reproduces what our effect relies on, read against Slicer's
qSlicerSegmentEditorAbstractEffect / qSlicerSegmentEditorScriptedEffect / the editor widget:
the effect is loaded by ``setPythonSource`` (the class named after the file), registered,
and each editor works on a clone; the editor calls ``setupOptionsFrame`` once, then
``setMRMLDefaults`` and ``updateGUIFromMRML`` when it gets its parameter node (a real
vtkMRMLSegmentEditorNode), ``updateGUIFromMRML`` on every Modified event of that node,
``activate``/``deactivate`` when the effect is chosen or left, ``cleanup`` before it is
deleted. Parameters are the node's attributes ``<effect name>.<parameter>``.

Not reproduced: the editor's masking in ``modifySelectedSegmentByLabelmap`` (the labelmap
replaces the whole segment, as Set mode does where no mask applies) and its undo stack
(``saveStateForUndo`` calls are counted).
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import slicer
import vtk

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

    def parameterDefined(self, name):
        return self._node is not None and self._node.GetAttribute(self._attribute(name)) is not None

    def parameter(self, name):
        if not self.parameterDefined(name):
            logging.error(f"qSlicerSegmentEditorAbstractEffect::parameter: parameter {name} not found")
            return ""
        return self._node.GetAttribute(self._attribute(name))

    def integerParameter(self, name):
        try:
            return int(self.parameter(name))
        except ValueError:
            return 0

    def setParameter(self, name, value):
        text = str(value)
        if self._node.GetAttribute(self._attribute(name)) != text:
            self._node.SetAttribute(self._attribute(name), text)
            self._node.Modified()

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
        if mode != MODIFICATION_MODE_SET:
            raise NotImplementedError("only Set mode is reproduced")
        node = self._node
        # Set mode with no mask: the whole segment is replaced by the labelmap (voxels of the
        # segment outside the labelmap's extent are erased), as Slicer's Set mode does
        ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, node.GetSegmentationNode(), node.GetSelectedSegmentID(),
            slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        if not ok:
            raise RuntimeError("SetBinaryLabelmapToSegment failed")


class SegmentEditor:
    """One Segment Editor widget with one effect: its own clone of the registered effect."""

    def __init__(self, registered, editorNode):
        self.effect = registered.self().clone()
        self.python = self.effect.self()
        self.python.setupOptionsFrame()
        self.effect._node = editorNode
        self.python.setMRMLDefaults()
        self.python.updateGUIFromMRML()
        self._tag = editorNode.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                           lambda caller, event: self.python.updateGUIFromMRML())

    def select(self):
        self.effect._active = True
        self.python.activate()

    def leave(self):
        self.effect._active = False
        self.python.deactivate()

    def delete(self):
        if self._tag is None:
            return
        if self.effect._active:
            self.leave()
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
