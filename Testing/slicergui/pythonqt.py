"""The ``qt`` module as Slicer's Python code sees it (PythonQt), built on real Qt (PySide6).

Why: Slicer's panels are Python over PythonQt, which has no PyPI build. PythonQt differs
from PySide where our panel code relies on it, and these differences are reproduced here
so that the same source runs unchanged:

* a Qt property reads and writes as an attribute (``button.text = "Cancel"``,
  ``combo.currentIndex``), and wins over the method of the same name;
* ``obj.connect("clicked(bool)", slot)`` takes the C++ signature; a signature the object
  does not have is an error here (PythonQt prints a warning and the slot never runs,
  which a test would not notice);
* ``obj.name`` is the object name (Slicer's ``childWidgetVariables`` reads it).

Every QObject class of QtCore, QtGui and QtWidgets is exposed as a subclass carrying
these rules, and the .ui loader builds widgets of exactly those classes, as PythonQt
does (Slicer's parameter-node connectors compare ``type(widget) == qt.QCheckBox``).
"""
from __future__ import annotations

import types
import xml.etree.ElementTree as ET

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

# C++ signatures of signals that PySide declares with Python objects (vtk pointers)
PYOBJECT_SIGNALS = {"vtkMRMLScene*": "PyObject", "vtkMRMLNode*": "PyObject"}


_PROPERTIES: dict = {}


def _propertyNames(cls) -> frozenset:
    """The Qt property names of a class (its meta-object's, inherited ones included)."""
    names = _PROPERTIES.get(cls)
    if names is None:
        meta = cls.staticMetaObject
        names = _PROPERTIES[cls] = frozenset(meta.property(i).name() for i in range(meta.propertyCount()))
    return names


def cppSignature(signature: str) -> str:
    """``currentNodeChanged(vtkMRMLNode*)`` -> the signature PySide registered."""
    name, _, args = signature.partition("(")
    args = args.rstrip(")")
    parts = [PYOBJECT_SIGNALS.get(a.strip(), a.strip()) for a in args.split(",") if a.strip()]
    return bytes(QtCore.QMetaObject.normalizedSignature(f"{name}({','.join(parts)})")).decode()


class PythonQtObject:
    """Attribute access of a QObject as PythonQt gives it (see the module docstring)."""

    def __getattribute__(self, name):
        if name == "name":
            return QtCore.QObject.objectName(self)
        if not name.startswith("_") and name in _propertyNames(type(self)):
            return QtCore.QObject.property(self, name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if name == "name":
            QtCore.QObject.setObjectName(self, value)
        elif not name.startswith("_") and name in _propertyNames(type(self)):
            if not QtCore.QObject.setProperty(self, name, value):
                raise AttributeError(f"{type(self).__name__}.{name} cannot be set to {value!r}")
        else:
            super().__setattr__(name, value)

    def connect(self, signature, slot):
        normalized = cppSignature(signature)
        if QtCore.QObject.metaObject(self).indexOfSignal(normalized) < 0:
            raise AttributeError(f"{type(self).__name__} has no signal {signature}")
        return QtCore.QObject.connect(self, QtCore.SIGNAL(normalized), slot)

    def disconnect(self, signature, slot):
        return QtCore.QObject.disconnect(self, QtCore.SIGNAL(cppSignature(signature)), slot)


def _pythonqtClass(cls):
    return type(cls.__name__, (PythonQtObject, cls), {"__module__": "qt"})


class QUiLoader(QtUiTools.QUiLoader):
    """Builds every widget of a .ui file from the ``qt`` module's classes or the registered
    stand-ins of Slicer's own widgets; the file's signal/slot connections are made after
    loading (PythonQt connects vtk-pointer signals, which QUiLoader cannot)."""

    customWidgets: dict = {}

    def createWidget(self, className, parent=None, name=""):
        cls = self.customWidgets.get(className) or getattr(qt, className, None)
        if cls is None:
            raise RuntimeError(f"the .ui file names a widget class no stand-in provides: {className}")
        widget = cls(parent)
        widget.setObjectName(name)
        self._created.append(widget)     # PySide would delete a parentless one on return
        return widget

    def load(self, device, parentWidget=None):
        self._created = []
        root = ET.fromstring(bytes(device.readAll()))
        connections = root.find("connections")
        if connections is not None:
            root.remove(connections)
        buffer = QtCore.QBuffer()
        buffer.setData(ET.tostring(root))
        buffer.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
        widget = super().load(buffer, parentWidget)
        if widget is not None and connections is not None:
            for c in connections.iter("connection"):
                find = lambda n: widget if QtCore.QObject.objectName(widget) == n else widget.findChild(QtCore.QObject, n)  # noqa: E731
                sender, receiver = find(c.findtext("sender")), find(c.findtext("receiver"))
                slot = c.findtext("slot").partition("(")[0]
                sender.connect(c.findtext("signal"), getattr(receiver, slot))
        return widget


def _build():
    module = types.ModuleType("qt", __doc__)
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            value = getattr(source, name)
            if name.startswith("_"):
                continue
            if isinstance(value, type) and issubclass(value, QtCore.QObject) and (
                    source is QtWidgets or name in ("QObject", "QTimer")):
                value = _pythonqtClass(value)   # not QFile & co: a subclass breaks their static overloads
            setattr(module, name, value)
    module.QUiLoader = QUiLoader
    # PythonQt returns the chosen path alone; PySide returns (path, filter)
    module.QFileDialog.getOpenFileName = staticmethod(
        lambda *args, **kwargs: QtWidgets.QFileDialog.getOpenFileName(*args, **kwargs)[0])
    module.PythonQtObject = PythonQtObject
    return module


qt = _build()
