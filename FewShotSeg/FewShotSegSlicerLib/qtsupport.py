"""GUI-side glue shared by the module widget and the Segment Editor effect (needs Qt).

Why: both run the same Logic (propagation and refinement in the worker process, downloads
on a thread) and show the same progress bar, Cancel button and status line; keeping that
here keeps FewShotSeg.py and the effect thin. The Logic never imports this file, so it
stays usable without Qt. A QTimer polls the job every 100 ms; polling never blocks.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import qt
import slicer

from FewShotSegLib.errors import FewShotSegError
from FewShotSegSlicerLib.tasks import BackgroundTask

POLL_MSEC = 100


class TaskRunner:
    """Runs one job at a time (a BackgroundTask, or a worker JobHandle given to
    ``startHandle``); its button reads Cancel while the job runs. Leaving the effect or
    the module does not stop it: the result is applied when it arrives."""

    def __init__(self, button, progressBar, statusLabel, startText: str = "Propagate"):
        self.button, self.progressBar, self.statusLabel = button, progressBar, statusLabel
        self.startText = startText
        self.task: Optional[BackgroundTask] = None
        self._onSuccess: Optional[Callable] = None
        self._onEnd: Optional[Callable] = None
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MSEC)
        self.timer.connect("timeout()", self._poll)
        self.progressBar.setVisible(False)

    @property
    def running(self) -> bool:
        return self.task is not None

    def start(self, function, onSuccess: Callable, onEnd: Optional[Callable] = None) -> None:
        if self.running:
            raise FewShotSegError("a task is already running: wait for it or cancel it")
        self.startHandle(BackgroundTask(function).start(), onSuccess, onEnd)

    def startHandle(self, handle, onSuccess: Callable, onEnd: Optional[Callable] = None) -> None:
        """Poll ``handle`` (poll(), status(), cancel(), cancelRequested, result, error)."""
        if self.running:
            raise FewShotSegError("a task is already running: wait for it or cancel it")
        self.task, self._onSuccess, self._onEnd = handle, onSuccess, onEnd
        self.button.text = "Cancel"
        self.button.enabled = True
        self.progressBar.setValue(0)
        self.progressBar.setVisible(True)
        self.timer.start()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.statusLabel.text = "Cancelling..."

    def _poll(self) -> None:
        if self.task is None:
            self.timer.stop()
            return
        try:
            finished = self.task.poll()
            fraction, message = self.task.status()
        except Exception as exc:  # noqa: BLE001 - the timer must not go on firing at a broken job
            logging.exception("FewShotSeg: polling the job failed")
            try:
                self.task.cancel()                # a job nobody polls must not run on unseen
            except Exception:  # noqa: BLE001 - the job is already broken; the message says so
                logging.exception("FewShotSeg: cancelling the broken job failed")
            self._finish(failure=exc)
            return
        self.progressBar.setValue(int(round(100 * fraction)))
        if message and not self.task.cancelRequested:
            self.statusLabel.text = message
        if finished:
            self._finish()

    def _finish(self, failure: Optional[BaseException] = None) -> None:
        task, onSuccess, onEnd = self.task, self._onSuccess, self._onEnd
        self.task = None
        self.timer.stop()
        self.progressBar.setVisible(False)
        self.button.text = self.startText
        try:
            if failure is not None:
                self.statusLabel.text = f"Failed: {failure}"
                slicer.util.errorDisplay(f"Failed: {failure}")
            elif task.cancelRequested or type(task.error).__name__ in ("PropagationCancelled", "RefineCancelled"):
                # also when the job ended between the Cancel click and this poll: not applied
                self.statusLabel.text = "Cancelled: the segmentation was not changed."
            elif task.error is None:
                self._apply(onSuccess, task.result)
            elif isinstance(task.error, FewShotSegError):
                self.statusLabel.text = str(task.error)
                slicer.util.errorDisplay(str(task.error))
            else:
                logging.error(task.errorTrace)
                self.statusLabel.text = f"Failed: {task.error}"
                slicer.util.errorDisplay(f"Failed: {task.error}", detailedText=task.errorTrace)
        finally:
            if onEnd is not None:
                onEnd()

    def _apply(self, onSuccess: Callable, result) -> None:
        """Write the result; when that is refused (the segment was edited or deleted meanwhile)
        the status line says so, not the job's last progress message."""
        try:
            with slicer.util.tryWithErrorDisplay("Could not write the result.", waitCursor=True):
                onSuccess(result)
        except FewShotSegError as exc:   # shown to the user already; nothing was written
            self.statusLabel.text = f"Not written: {exc}"
        except Exception as exc:
            self.statusLabel.text = f"Could not write the result: {exc}"
            raise                        # a defect: Slicer's console prints the traceback

    def stop(self) -> None:
        """Scene cleared or module reloaded: cancel and forget the result (never called when
        the user merely leaves the effect or the module)."""
        if self.task is not None:
            self.task.cancel()
            self._onSuccess = lambda result: None


def showUncertaintyOverlay(volumeNode, uncertaintyNode, opacity: float = 0.5) -> None:
    """The image behind, its uncertainty volume in front (zero is transparent), all slice views."""
    slicer.util.setSliceViewerLayers(background=volumeNode, foreground=uncertaintyNode,
                                      foregroundOpacity=opacity)


def jumpSlicesTo(position) -> None:
    """Every slice view through ``position`` (world RAS), centred on it."""
    r, a, s = (float(v) for v in position)
    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


class SuggestionList:
    """Where to look next: labels with world positions, and a cursor for a Next button."""

    def __init__(self):
        self.items = []    # objects with .label and .position (RAS)
        self.index = -1

    def set(self, items) -> None:
        self.items, self.index = list(items), -1

    def next(self):
        """Jump all slice views to the next item; returns it (None if the list is empty)."""
        if not self.items:
            return None
        self.index = (self.index + 1) % len(self.items)
        item = self.items[self.index]
        jumpSlicesTo(item.position)
        return item

    def text(self, limit: int = 3) -> str:
        if not self.items:
            return ""
        return "Look next at: " + "; ".join(item.label for item in self.items[:limit])
