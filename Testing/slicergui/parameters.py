"""A stand-in for ``slicer.parameterNodeWrapper``: typed parameters on a real MRML node.

Why: Slicer's wrapper is Python inside Slicer (not in slicer-core). This one follows it
where our panel depends on it (read against Slicer's wrapper.py and guiConnectors.py):
values are stored in the node (strings; nodes as references), a missing value is written
with its default when the wrapper is made, ``Choice`` and ``WithinRange`` refuse values
outside them, and ``connectGui`` binds every widget whose ``SlicerParameterName`` property
names a parameter, choosing the connector by the widget's exact class as Slicer does
(a combo box is cleared and filled with the choices; a spin box takes the range), and
refreshes every bound widget on each Modified event of the node.
"""
from __future__ import annotations

import dataclasses
import typing

import slicer
import vtk

PARAMETER_NAME_PROPERTY = "SlicerParameterName"


@dataclasses.dataclass
class Choice:
    choices: tuple

    def __init__(self, choices):
        self.choices = tuple(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"value {value!r} is not one of {list(self.choices)}")


@dataclasses.dataclass
class WithinRange:
    minimum: float
    maximum: float

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"value {value!r} is not within [{self.minimum}, {self.maximum}]")


def _isNode(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)


class _Parameter:
    def __init__(self, name, kind, annotations, default):
        self.name, self.kind, self.annotations, self.default = name, kind, annotations, default

    def read(self, node):
        if _isNode(self.kind):
            return node.GetNodeReference(self.name)
        if not self.isIn(node):        # as Slicer's wrapper: a missing value (a scene close) is the default
            self.write(node, self.default)
        text = node.GetParameter(self.name)
        if self.kind is bool:
            return text == "True"
        return self.kind(text)

    def write(self, node, value):
        """Refused, as Slicer's NotNone / IsInstance validators refuse them: None for a plain
        type, a value of another type (no conversion: "False" is not a bool)."""
        if _isNode(self.kind):
            if value is not None and not isinstance(value, self.kind):
                raise ValueError(f"{self.name}: a {type(value).__name__} is not a {self.kind.__name__}")
        elif value is None or not isinstance(value, self.kind):
            raise ValueError(f"{self.name}: {value!r} is not a {self.kind.__name__}")
        for check in self.annotations:
            check.validate(value)
        if _isNode(self.kind):
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(self.name, str(value))

    def isIn(self, node) -> bool:
        return node.GetNodeReferenceID(self.name) is not None if _isNode(self.kind) else node.HasParameter(self.name)


# -- connectors: (widget class name, test on the parameter) -> read / write / change signal ----
class _Connector:
    def __init__(self, widget, parameter):
        self.widget, self.parameter = widget, parameter
        className = type(widget).__name__
        annotations = {type(a): a for a in parameter.annotations}
        if className == "QCheckBox" and parameter.kind is bool:
            self.signal, self.property = widget.stateChanged, "checked"
        elif className == "QSpinBox" and parameter.kind is int:
            self.signal, self.property = widget.valueChanged, "value"
            if WithinRange in annotations:
                widget.setRange(annotations[WithinRange].minimum, annotations[WithinRange].maximum)
            else:
                widget.setRange(-2 ** 31, 2 ** 31 - 1)
        elif className == "QComboBox" and parameter.kind in (str, int, float, bool):
            if Choice not in annotations:
                raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
            self.choices = annotations[Choice].choices
            widget.clear()
            for c in self.choices:
                widget.addItem(str(c))
            self.signal, self.property = widget.currentIndexChanged, None
        elif className == "qMRMLNodeComboBox" and _isNode(parameter.kind):
            widget.nodeTypes = [parameter.kind.__name__]
            self.signal, self.property = widget.currentNodeChanged, None
        else:
            raise RuntimeError(f"Unable to create GUI connector from datatype '{parameter.kind}' "
                               f"to widget type '{type(widget)}'")

    def read(self):
        if self.property:
            return getattr(self.widget, self.property)
        if hasattr(self, "choices"):
            return self.choices[self.widget.currentIndex]
        return self.widget.currentNode()

    def write(self, value):
        if self.property:
            setattr(self.widget, self.property, value)
        elif hasattr(self, "choices"):
            self.widget.currentIndex = self.choices.index(value)
        else:
            self.widget.setCurrentNode(value)


def _processClass(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    parameters = {}
    for name, hint in hints.items():
        kind, annotations = hint, ()
        if typing.get_origin(hint) is typing.Annotated:
            kind, *annotations = typing.get_args(hint)
        default = cls.__dict__.get(name, None if _isNode(kind) else kind())
        parameters[name] = _Parameter(name, kind, tuple(annotations), default)
        setattr(cls, name, property(lambda self, p=parameters[name]: p.read(self.parameterNode),
                                    lambda self, value, p=parameters[name]: self._write(p, value)))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._guis, self._nextTag, self._updating = {}, 0, False
        for p in parameters.values():
            if not p.isIn(parameterNode) and p.default is not None:
                p.write(parameterNode, p.default)

    def _write(self, parameter, value):
        with slicer.util.NodeModify(self.parameterNode):
            parameter.write(self.parameterNode, value)

    def connectGui(self, gui):
        widgets = {}
        for widget in gui.__dict__.values():
            name = widget.property(PARAMETER_NAME_PROPERTY)
            if name:
                if name not in parameters:
                    raise ValueError(f"Cannot find a param with the given name: {name}")
                widgets[name] = widget
        connectors = {name: _Connector(w, parameters[name]) for name, w in widgets.items()}
        tag, self._nextTag = self._nextTag, self._nextTag + 1
        self._guis[tag] = connectors
        for name, connector in connectors.items():
            connector.write(getattr(self, name))

            def changed(*args, name=name, connector=connector):
                if not self._updating and tag in self._guis:
                    setattr(self, name, connector.read())
            connector.signal.connect(changed)
            connector.slot = changed
        connectors["_observer"] = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                                                 lambda caller, event: self._updateGui())
        return tag

    def _updateGui(self):
        if self._updating:
            return
        self._updating = True
        try:
            for connectors in self._guis.values():
                for name, connector in connectors.items():
                    if name != "_observer":
                        connector.write(getattr(self, name))
        finally:
            self._updating = False

    def disconnectGui(self, tag):
        """Slicer's wrapper leaves its node observer in place (harmless in Slicer, whose panels
        live as long as the application); here panels are deleted between tests."""
        connectors = self._guis.pop(tag, {})
        if "_observer" in connectors:
            self.parameterNode.RemoveObserver(connectors.pop("_observer"))
        for connector in connectors.values():
            connector.signal.disconnect(connector.slot)

    members = dict(__init__=__init__, _write=_write, connectGui=connectGui, _updateGui=_updateGui,
                   disconnectGui=disconnectGui, allParameters=parameters,
                   AddObserver=lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
                       event, callback, priority),
                   RemoveObserver=lambda self, tag: self.parameterNode.RemoveObserver(tag),
                   StartModify=lambda self: self.parameterNode.StartModify(),
                   EndModify=lambda self, was: self.parameterNode.EndModify(was),
                   Modified=lambda self: self.parameterNode.Modified())
    for key, value in members.items():
        setattr(cls, key, value)
    return cls


def parameterNodeWrapper(cls=None):
    return _processClass if cls is None else _processClass(cls)
