"""Stand-ins for the CTK and Slicer widgets our .ui file names, on the real MRML scene.

Why: ``ctkCollapsibleButton``, ``qMRMLNodeComboBox`` and ``qMRMLSegmentSelectorWidget`` are
C++ widgets of Slicer with no PyPI build. Each stand-in has the properties, signals and
methods our panel uses, with the behaviour of Slicer's classes that the panel depends on
(checked against Slicer's source): a node combo box lists the scene's nodes of its types
(subclasses only with ``showChildNodeTypes``, never nodes hidden from editors) and, with
``noneEnabled`` off, always selects one when there is one; the segment selector picks the
first segment of a segmentation and says nothing when the segmentation has none.
"""
from __future__ import annotations

import slicer
import vtk
from PySide6 import QtCore, QtWidgets

from .pythonqt import PythonQtObject


def _boolProperty(name: str, default: bool):
    def getter(self):
        return getattr(self, "_" + name, default)

    def setter(self, value):
        PythonQtObject.__setattr__(self, "_" + name, bool(value))
    return QtCore.Property(bool, getter, setter)


def _forget(observed, tags):
    """A deleted widget's observers go with it (Slicer's widgets remove theirs in their destructor)."""
    if observed is not None:
        for tag in tags:
            observed.RemoveObserver(tag)
    tags.clear()


class ctkCollapsibleButton(PythonQtObject, QtWidgets.QWidget):
    def _text(self):
        return getattr(self, "_textValue", "")

    def _setText(self, value):
        PythonQtObject.__setattr__(self, "_textValue", str(value))
    text = QtCore.Property(str, _text, _setText)
    collapsed = _boolProperty("collapsed", False)


class qMRMLWidget(PythonQtObject, QtWidgets.QWidget):
    mrmlSceneChanged = QtCore.Signal(object)

    def setMRMLScene(self, scene):
        PythonQtObject.__setattr__(self, "_scene", scene)
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return getattr(self, "_scene", None)


class qMRMLNodeComboBox(PythonQtObject, QtWidgets.QWidget):
    currentNodeChanged = QtCore.Signal(object)
    mrmlSceneChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        QtWidgets.QWidget.__init__(self, parent)
        state = {"scene": None, "types": [], "current": None, "tags": []}
        PythonQtObject.__setattr__(self, "_state", state)
        self.destroyed.connect(lambda *args: _forget(state["scene"], state["tags"]))

    def _types(self):
        return list(self._state["types"])

    def _setTypes(self, value):
        self._state["types"] = [str(v) for v in value]
        self._refresh()
    nodeTypes = QtCore.Property("QStringList", _types, _setTypes)
    showChildNodeTypes = _boolProperty("showChildNodeTypes", True)
    noneEnabled = _boolProperty("noneEnabled", False)
    addEnabled = _boolProperty("addEnabled", True)
    removeEnabled = _boolProperty("removeEnabled", True)
    editEnabled = _boolProperty("editEnabled", False)
    renameEnabled = _boolProperty("renameEnabled", False)
    showHidden = _boolProperty("showHidden", False)
    selectNodeUponCreation = _boolProperty("selectNodeUponCreation", True)

    def setMRMLScene(self, scene):
        state = self._state
        for tag in state["tags"]:
            state["scene"].RemoveObserver(tag)
        state["scene"], state["tags"] = scene, []
        if scene is not None:
            state["tags"] = [scene.AddObserver(event, lambda caller, event: self._refresh())
                             for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        self.mrmlSceneChanged.emit(scene)
        self._refresh()

    def mrmlScene(self):
        return self._state["scene"]

    def nodes(self) -> list:
        """The nodes the list shows, in scene order."""
        scene, types = self._state["scene"], self._state["types"]
        if scene is None:
            return []
        out = []
        for i in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(i)
            shown = any(node.IsA(t) if self.showChildNodeTypes else node.GetClassName() == t for t in types)
            if shown and (self.showHidden or not node.GetHideFromEditors()):
                out.append(node)
        return out

    def _refresh(self):
        """After a node was added or removed: a removed current node gives way to its
        neighbour in the list (Qt moves a combo box's current row so), and with ``noneEnabled``
        off an empty choice takes the first node."""
        state = self._state
        before, nodes = state.get("listed", []), self.nodes()
        state["listed"] = nodes
        current = state["current"]
        if current is not None and current not in nodes:
            row = before.index(current) if current in before else 0
            remaining = [n for n in before if n in nodes]
            self._select(remaining[min(row, len(remaining) - 1)] if remaining else None)
        if state["current"] is None and not self.noneEnabled and nodes:
            self._select(nodes[0])

    def _select(self, node):
        if node is self._state["current"]:
            return
        self._state["current"] = node
        if not self.signalsBlocked():
            self.currentNodeChanged.emit(node)

    def currentNode(self):
        return self._state["current"]

    def currentNodeID(self):
        node = self._state["current"]
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node):
        """A node the list does not show, or None, leaves no node chosen (Slicer's combo box
        sets no row then, and says so)."""
        self._select(node if node is not None and node in self.nodes() else None)


class qMRMLSegmentSelectorWidget(qMRMLWidget):
    """As Slicer's (qMRMLSegmentSelectorWidget.cxx, single selection): every SegmentAdded,
    SegmentRemoved and SegmentModified of the segmentation (a paint stroke, a tag or status
    set on a segment) and every change of segmentation rebuild the segment list: the list is
    cleared, which announces "" while it held items, then the first segment is selected and
    announced. A segmentation without segments announces nothing more."""

    currentNodeChanged = QtCore.Signal(object)
    currentSegmentChanged = QtCore.Signal(str)
    segmentationNodeSelectorVisible = _boolProperty("segmentationNodeSelectorVisible", True)
    noneEnabled = _boolProperty("noneEnabled", False)
    editEnabled = _boolProperty("editEnabled", False)

    def __init__(self, parent=None):
        qMRMLWidget.__init__(self, parent)
        sel = {"node": None, "segment": "", "listed": [], "tags": []}
        PythonQtObject.__setattr__(self, "_sel", sel)
        self.destroyed.connect(lambda *args: _forget(sel["node"], sel["tags"]))

    def currentNode(self):
        return self._sel["node"]

    def currentNodeID(self):
        node = self._sel["node"]
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node):
        sel = self._sel
        if node is sel["node"]:
            return
        if sel["node"] is not None:
            _forget(sel["node"], sel["tags"])
        sel["node"], sel["tags"] = node, []
        if node is not None:
            events = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                      slicer.vtkSegmentation.SegmentModified)
            sel["tags"] = [node.AddObserver(event, lambda caller, event: self._populate()) for event in events]
        if not self.signalsBlocked():
            self.currentNodeChanged.emit(node)
        self._populate()

    def segmentIDs(self) -> list:
        node = self._sel["node"]
        if node is None:
            return []
        s = node.GetSegmentation()
        return [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]

    def _populate(self):
        sel = self._sel
        if sel["listed"]:                    # QComboBox::clear() with items: currentIndexChanged(-1)
            sel["listed"] = []
            self._announce("")
        ids = self.segmentIDs()
        sel["listed"] = ids
        if ids:
            self._announce(ids[0])

    def _announce(self, segmentId):
        self._sel["segment"] = segmentId
        if not self.signalsBlocked():
            self.currentSegmentChanged.emit(segmentId)

    def currentSegmentID(self):
        return self._sel["segment"]

    def setCurrentSegmentID(self, segmentId):
        if segmentId in self._sel["listed"] and segmentId != self._sel["segment"]:
            self._announce(segmentId)


WIDGETS = {cls.__name__: cls for cls in (ctkCollapsibleButton, qMRMLWidget, qMRMLNodeComboBox,
                                         qMRMLSegmentSelectorWidget)}
