"""One call into the engine, shared by the in-process Logic and the worker process.

Why: both must run FewShotSegLib.propagation.propagate (exclude, session, options) and
FewShotSegLib.refinement's refine the same way, and turn the result into plain values
(suggestions, warnings) that can cross a process boundary. No Slicer and no Qt here: the
worker process imports this file.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import numpy as np


def newSession():
    """A PropagationSession when the engine has one (incremental re-propagation), else None."""
    try:
        from FewShotSegLib.propagation import PropagationSession
    except ImportError:
        return None
    return PropagationSession()


def _accepts(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def run(image, support: np.ndarray, model, mode: str, axisIndex: int, axisName: str, device: str,
        intensityGate: bool, exclude: Optional[np.ndarray] = None, session=None, progress: Optional[Callable] = None,
        cancel: Optional[Callable] = None, walkStepMm: float = 0.0, editable: Optional[np.ndarray] = None):
    """propagate() with the Logic's options; the excluded voxels, and those outside the
    ``editable`` area, are never in ``result.mask``."""
    from FewShotSegLib import propagation
    from FewShotSegLib.propagation import PropagationOptions, propagate

    # the engine before issue #34 takes anatomical names only
    axis = int(axisIndex) if hasattr(propagation, "resolve_axis") else axisName
    if getattr(model, "kind", None) == "propagator":
        mode = "learned"   # a step network runs one way; the mode choice is for few-shot models
    options = PropagationOptions(mode=mode, axis=axis, device=device, intensity_gate=bool(intensityGate))
    if walkStepMm:
        if not hasattr(options, "walk_step_mm"):
            from FewShotSegLib.errors import FewShotSegError

            raise FewShotSegError("this engine steps on every slice: update FewShotSeg for faster walks across thin slices")
        options.walk_step_mm = float(walkStepMm)
    kwargs = {}
    if exclude is not None and _accepts(propagate, "exclude"):
        kwargs["exclude"] = exclude
    engineKeepsInside = editable is not None and _accepts(propagate, "editable")
    if engineKeepsInside:
        kwargs["editable"] = editable
    if session is not None and _accepts(propagate, "session"):
        kwargs["session"] = session
    result = propagate(image, support, model, options, progress=progress, cancel=cancel, **kwargs)
    if result.mask.shape != support.shape:
        from FewShotSegLib.errors import FewShotSegError

        raise FewShotSegError(f"the engine returned shape {result.mask.shape}, expected {support.shape}")
    if exclude is not None:  # an engine without exclude: still never write the excluded voxels
        result.mask = np.where(exclude, 0, result.mask).astype(np.uint8)
    if editable is not None and not engineKeepsInside:  # an engine without editable: cut afterwards
        result.mask = np.where(editable | support, result.mask, 0).astype(np.uint8)
    return result


def runStructures(image, parts: list, model, mode: str, device: str, intensityGate: bool, session=None,
                  progress: Optional[Callable] = None, cancel: Optional[Callable] = None, walkStepMm: float = 0.0):
    """Several segments in one run (FewShotSegLib.structures): ``parts`` holds per segment
    {"support", "exclude", "editable", "axisIndex"}; part k is label k + 1 of the result's
    label map, whose voxels two segments claimed went to the one painted nearest."""
    from FewShotSegLib.propagation import PropagationOptions
    from FewShotSegLib.structures import propagate_structures

    if getattr(model, "kind", None) == "propagator":
        mode = "learned"
    options = PropagationOptions(mode=mode, device=device, intensity_gate=bool(intensityGate),
                                 walk_step_mm=float(walkStepMm))
    labels = np.zeros(parts[0]["support"].shape, np.uint16)
    excludes, editables, axes, names = {}, {}, {}, {}
    for value, part in enumerate(parts, start=1):
        labels[part["support"]] = value
        axes[value] = int(part["axisIndex"])
        names[value] = part.get("name") or f"segment {value}"
        for name, into in (("exclude", excludes), ("editable", editables)):
            if part.get(name) is not None:
                into[value] = part[name]
    result = propagate_structures(image, labels, model, options, progress=progress, cancel=cancel,
                                  exclude=excludes, editable=editables, session=session, axes=axes,
                                  names=names)
    return result


def refine(image, coarse: np.ndarray, keep: Optional[np.ndarray], refiner, samples: int, steps: int, axisName: str,
           device: str, progress: Optional[Callable] = None, cancel: Optional[Callable] = None):
    """The refiner's refine() with the Logic's options; mask and uncertainty on the volume grid."""
    from FewShotSegLib.errors import FewShotSegError
    from FewShotSegLib.refinement.sampling import RefineOptions, refine as refineVolume

    options = RefineOptions(samples=samples, steps=steps, axis=axisName, device=device)
    result = refineVolume(image, coarse, refiner, options, progress=progress, cancel=cancel, keep=keep)
    for name in ("mask", "uncertainty"):
        if getattr(result, name).shape != coarse.shape:
            raise FewShotSegError(f"the refiner returned a {name} of shape "
                                  f"{getattr(result, name).shape}, expected {coarse.shape}")
    return result


def summary(result) -> dict:
    """The result's plain fields (everything but the arrays), JSON-serialisable."""
    suggestions = [{"slice": int(getattr(s, "slice")), "score": float(getattr(s, "score", 0.0)),
                    "reason": str(getattr(s, "reason", ""))} for s in (getattr(result, "suggestions", None) or [])]
    return {"seconds": float(getattr(result, "seconds", 0.0)),
            "network_seconds": float(getattr(result, "network_seconds", 0.0)),
            "slices_done": int(getattr(result, "slices_done", 0)),
            "anchors": [int(i) for i in (getattr(result, "anchors", None) or [])],
            "end_anchors": [int(i) for i in (getattr(result, "end_anchors", None) or [])],
            "suggestions": suggestions,
            "warnings": [str(w) for w in (getattr(result, "warnings", None) or [])],
            "mode": str(getattr(result, "mode", "") or "")}


class EngineResult:
    """What the Logic needs of a propagation or a refinement (``uncertainty``), wherever it ran."""

    def __init__(self, mask: np.ndarray, fields: dict, uncertainty: Optional[np.ndarray] = None):
        self.mask = mask
        self.uncertainty = uncertainty
        self.seconds = fields.get("seconds", 0.0)
        self.network_seconds = fields.get("network_seconds", 0.0)
        self.slices_done = fields.get("slices_done", 0)
        self.mode = fields.get("mode", "")     # the mode that ran (a step network runs 'learned')
        self.anchors = fields.get("anchors", [])
        self.end_anchors = fields.get("end_anchors", [])
        self.suggestions = [Suggestion(**s) for s in fields.get("suggestions", [])]
        self.warnings = list(fields.get("warnings", []))
        self.worker_seconds = fields.get("worker_seconds")   # the whole job inside the worker process
        self.worker_cpu_seconds = fields.get("worker_cpu_seconds")
        self.worker_process_cpu_seconds = fields.get("worker_process_cpu_seconds")

    @classmethod
    def fromEngine(cls, result) -> "EngineResult":
        return cls(np.asarray(result.mask), summary(result))


class Suggestion:
    def __init__(self, slice: int, score: float = 0.0, reason: str = ""):
        self.slice, self.score, self.reason = int(slice), float(score), str(reason)

    def __repr__(self):
        return f"Suggestion(slice={self.slice}, score={self.score:.3f}, reason={self.reason!r})"
