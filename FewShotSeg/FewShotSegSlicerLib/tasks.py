"""Run long work on a Python thread and let the GUI poll it (model downloads).

Why: MRML and Qt must only be touched on the main thread. The thread only sees copied
arrays; the GUI polls ``fraction``/``message`` with a timer and applies the result on the
main thread once ``finished`` is True. Caveat: Slicer's main loop holds the GIL between
events, so such a thread runs only when the GUI runs Python (20x slower measured);
propagation and refinement therefore run in the worker process (workerclient.py), not here.
"""
from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Callable, Optional


class BackgroundTask:
    """``function(progress, cancel)`` on a daemon thread, with thread-safe progress state."""

    def __init__(self, function: Callable[[Callable[[float, str], None], Callable[[], bool]], Any],
                 name: str = "FewShotSeg"):
        self._function = function
        self._lock = threading.Lock()
        self._cancelEvent = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.fraction, self.message = 0.0, ""
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.errorTrace = ""
        self.started = self.ended = None

    # -- worker side -------------------------------------------------------------------
    def _progress(self, fraction: float, message: str = "") -> None:
        with self._lock:
            self.fraction = max(0.0, min(1.0, float(fraction)))
            self.message = message

    def _run(self) -> None:
        self.started = time.perf_counter()
        try:
            self.result = self._function(self._progress, self._cancelEvent.is_set)
        except BaseException as exc:  # reported to the GUI, never lost in a thread
            self.error = exc
            self.errorTrace = traceback.format_exc()
        finally:
            self.ended = time.perf_counter()

    # -- GUI side ------------------------------------------------------------------------
    def start(self) -> "BackgroundTask":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancelEvent.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancelEvent.is_set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def finished(self) -> bool:
        return self.ended is not None and not self._thread.is_alive()

    def poll(self) -> bool:
        """Same call as the worker's JobHandle: True once finished."""
        return self.finished

    def status(self) -> tuple[float, str]:
        with self._lock:
            return self.fraction, self.message

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return self.finished
