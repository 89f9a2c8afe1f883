"""Slicer's application as our module sees it, on slicer-core's real MRML and Slicer's own
``slicer.util`` (which slicer-core ships), with real Qt widgets (PySide6, offscreen).

``install()`` puts the ``qt`` and ``ctk`` modules in place, gives the ``slicer`` package
what the desktop application adds to it (``app``, ``mrmlScene``, the scripted-module base
classes, the parameter node wrapper, Slicer's widgets) and loads our module as Slicer
does: every top-level ``.py`` of the module folder as a module, then ``startupCompleted()``.
Slicer's main loop is reproduced by ``SlicerApplication.runFor``: Qt events, and between
them a wait that holds the GIL (``ctypes.PyDLL(None).usleep``), as Slicer's loop does.

What it is not: PythonQt and Slicer's C++ widgets are stand-ins (``pythonqt.py``,
``mrmlwidgets.py``); Slicer's views, undo stack and modal dialogs do not exist here
(Slicer's own errorDisplay logs the message where there is no main window; every logged
error and every exception out of a slot is recorded in ``app.errors``).
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
import time
import types
import unittest
from pathlib import Path

from PySide6 import QtCore, QtWidgets

from . import editor, mrmlwidgets, parameters
from .pythonqt import PythonQtObject, qt

USLEEP = ctypes.PyDLL(None).usleep


class SlicerApplication(PythonQtObject, QtWidgets.QApplication):
    """``slicer.app``: a QApplication with Slicer's few extra calls; errors shown to the
    user (``slicer.util.errorDisplay``, uncaught exceptions in slots) are recorded."""

    startupCompleted = QtCore.Signal()

    def __init__(self):
        super().__init__(["Slicer"])
        self.errors: list[str] = []
        self.applicationName = "Slicer"
        self.setApplicationName("Slicer")

    def moduleManager(self):
        return self

    def module(self, name):
        """``moduleManager().module(name)``: the loaded module's record (or None)."""
        import slicer
        return getattr(slicer.modules, name.lower(), None)

    def testingEnabled(self):
        return False     # as for a user: errors go through errorDisplay, which logs them and,
        #                  with no main window here, shows no box (Slicer's _messageDisplay)

    def runFor(self, seconds: float, until=lambda: False, pollMs: int = 10) -> bool:
        """Slicer's main loop for ``seconds`` or until ``until()``: Qt events, and between
        them a wait holding the GIL. Returns whether ``until()`` became true."""
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.processEvents()
            if until():
                return True
            USLEEP(pollMs * 1000)
        return bool(until())


class _ErrorRecorder(logging.Handler):
    def __init__(self, app):
        super().__init__(logging.ERROR)
        self.app = app

    def emit(self, record):
        self.app.errors.append(record.getMessage())


# -- slicer.ScriptedLoadableModule --------------------------------------------------------
class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__
        parent.title = self.moduleName


class ScriptedLoadableModuleWidget:
    """As Slicer's: given no parent it makes one (a qMRMLWidget on the scene) and calls
    setup() itself; Slicer's C++ passes a parent and calls setup() after (``newPanel``)."""

    def __init__(self, parent=None):
        import slicer

        self.moduleName = type(self).__name__[:-len("Widget")]
        if not parent:
            self.parent = mrmlwidgets.qMRMLWidget()
            self.parent.setLayout(qt.QVBoxLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()

    def resourcePath(self, filename):
        module = sys.modules[type(self).__module__]
        return os.path.join(os.path.dirname(module.__file__), "Resources", filename)

    def setup(self):
        pass


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):
        logging.info(message)


def _scriptedModuleBase():
    module = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


def install(core):
    """Make ``import qt``, ``import ctk`` and Slicer's Python layer work in this process,
    on ``core`` (FewShotSegSlicerLib.headless.SlicerCore: a real scene and module logics).
    Returns ``slicer.app``."""
    import slicer

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = qt.QApplication.instance() or SlicerApplication()
    logging.getLogger().addHandler(_ErrorRecorder(app))

    def uncaught(kind, value, trace):       # an exception out of a slot: Slicer prints it
        app.errors.append(f"uncaught {kind.__name__}: {value}")
        sys.__excepthook__(kind, value, trace)
    sys.excepthook = uncaught
    sys.modules["qt"] = qt
    ctk = types.ModuleType("ctk")
    ctk.ctkCollapsibleButton = mrmlwidgets.ctkCollapsibleButton
    sys.modules["ctk"] = ctk
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper, pnw.Choice, pnw.WithinRange = (parameters.parameterNodeWrapper, parameters.Choice,
                                                             parameters.WithinRange)
    sys.modules["slicer.parameterNodeWrapper"] = slicer.parameterNodeWrapper = pnw
    sys.modules["slicer.ScriptedLoadableModule"] = slicer.ScriptedLoadableModule = _scriptedModuleBase()
    for name, cls in mrmlwidgets.WIDGETS.items():
        setattr(slicer, name, cls)
    qt.QUiLoader.customWidgets = dict(mrmlwidgets.WIDGETS)
    slicer.app, slicer.mrmlScene = app, core.scene
    slicer.qSlicerScriptedLoadableModuleWidget = qSlicerScriptedLoadableModuleWidget
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: core.volumes),
        segmentations=types.SimpleNamespace(logic=lambda: core.segmentations))
    editor.installModules()
    return app


class qSlicerScriptedLoadableModuleWidget:
    """The C++ panel of a scripted module: ``self()`` is the Python widget."""

    def __init__(self, widget):
        self._widget = widget

    def self(self):
        return self._widget


def enterPanel(widget):
    widget.parent.isEntered = True
    widget.enter()


def exitPanel(widget):
    widget.parent.isEntered = False
    widget.exit()


class LoadedModule:
    """``slicer.modules.<name>``: the module object (kept alive, as Slicer's C++ module
    keeps it) and its panel, made and set up the first time it is asked for."""

    def __init__(self, name, pythonModule):
        self.name, self.pythonModule = name, pythonModule
        self.instance = getattr(pythonModule, name)(self)
        self._panel = None

    def newPanel(self):
        """The module's panel as Slicer's C++ makes it: a parent widget on the scene, the
        Python widget on it, then setup()."""
        import slicer

        parent = mrmlwidgets.qMRMLWidget()
        parent.setLayout(qt.QVBoxLayout())
        parent.setMRMLScene(slicer.mrmlScene)
        parent.isEntered = False           # Slicer sets it before enter() and clears it before exit()
        widget = getattr(self.pythonModule, self.name + "Widget")(parent)
        widget.setup()
        return widget

    def widgetRepresentation(self):
        if self._panel is None:
            self._panel = qSlicerScriptedLoadableModuleWidget(self.newPanel())
        return self._panel

    def deletePanel(self):
        if self._panel is not None:
            self._panel.self().cleanup()
            self._panel = None


def loadModuleFolder(folder: Path) -> dict:
    """Every top-level .py of a module folder imported as a module, as Slicer's module
    factory does; then startupCompleted(). Returns name -> module."""
    import slicer

    sys.path.insert(0, str(folder))
    loaded = {}
    for path in sorted(folder.glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        loaded[path.stem] = module
        record = LoadedModule(path.stem, module)
        setattr(slicer.modules, path.stem.lower(), record)
    slicer.app.startupCompleted.emit()
    return loaded


class Session:
    """What ``install`` and ``loadModuleFolder`` gave: ``slicer.app`` and the modules."""

    def __init__(self, app, modules):
        self.app, self.modules = app, modules


_INSTALLED_MODULES = ("qt", "ctk", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule",
                      "SegmentEditorEffects", "qSlicerSegmentationsEditorEffectsPythonQt", "FewShotSeg",
                      "SegmentEditorFewShotPropagateEffect", "FewShotSegSlicerLib.qtsupport")


def uninstall():
    """Back to plain slicer-core for the tests that follow: the shared worker stopped, the
    modules and attributes ``install`` added removed (the QApplication stays: Qt allows one)."""
    import slicer
    from FewShotSegSlicerLib.logic import shutdownSharedLogic

    shutdownSharedLogic()
    for name in _INSTALLED_MODULES:
        sys.modules.pop(name, None)
    for record in vars(slicer.modules).values():
        if isinstance(record, LoadedModule):
            record.deletePanel()
    for name in ("app", "mrmlScene", "modules", "parameterNodeWrapper", "ScriptedLoadableModule",
                 "qSlicerScriptedLoadableModuleWidget",
                 "qSlicerSegmentEditorAbstractEffect", *mrmlwidgets.WIDGETS):
        if name in vars(slicer):
            delattr(slicer, name)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ErrorRecorder)]:
        root.removeHandler(handler)
    editor.REGISTERED.clear()
    sys.excepthook = sys.__excepthook__
