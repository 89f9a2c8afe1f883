"""Slicer's side of the worker process: start it, send jobs (propagate, refine), poll for
progress and results.

Why polling and no thread: Slicer's main loop holds the GIL between events, so a reader
thread would run only when the GUI happens to run Python. Instead the GUI's timer calls
``handle.poll()``, which reads whatever the worker wrote (non-blocking) and returns at
once. No Qt here: the Logic, the tests and the benchmarks drive this without a GUI.

Crash: the worker's pipe closes or it exits without an answer -> one FewShotSegError, the
worker is dropped and the next job starts a fresh one. Cancel: a cancel line, which the
worker checks through the engine's cancel callback; if it does not answer within
CANCEL_GRACE_SECONDS it is killed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from FewShotSegLib.errors import FewShotSegError

CANCEL_GRACE_SECONDS = 5.0
QUIT_GRACE_SECONDS = 2.0


class WorkerStopped(FewShotSegError):
    """The worker process ended without answering; the segmentation was not changed."""


def workerPython() -> str:
    """The interpreter for the worker: $FEWSHOTSEG_WORKER_PYTHON, else inside Slicer its
    PythonSlicer launcher (sys.executable is the Slicer application there), else this one."""
    chosen = os.environ.get("FEWSHOTSEG_WORKER_PYTHON")
    if chosen:
        return chosen
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            found = shutil.which("PythonSlicer")
            if found:
                return found
    except ImportError:
        pass
    return sys.executable


class _PipeReader:
    """Reads the lines a pipe holds now, never waits (POSIX non-blocking fd, Windows PeekNamedPipe)."""

    def __init__(self, pipe):
        self.fd = pipe.fileno()
        self.buffer = b""
        self.eof = False
        if os.name != "nt":
            os.set_blocking(self.fd, False)

    def _available(self) -> Optional[bytes]:
        """Bytes now in the pipe, None if none, b"" at end of file."""
        if os.name == "nt":
            import ctypes
            import msvcrt
            from ctypes import wintypes

            available = wintypes.DWORD()
            handle = msvcrt.get_osfhandle(self.fd)
            if not ctypes.windll.kernel32.PeekNamedPipe(wintypes.HANDLE(handle), None, 0, None,
                                                        ctypes.byref(available), None):
                return b""  # broken pipe: the worker is gone
            return os.read(self.fd, available.value) if available.value else None
        try:
            return os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return None

    def messages(self) -> list[dict]:
        chunks = []
        while not self.eof:
            data = self._available()
            if data is None:
                break
            if not data:
                self.eof = True
                break
            chunks.append(data)
        if chunks:
            self.buffer += b"".join(chunks)
        *lines, self.buffer = self.buffer.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


class WorkerProcess:
    """One running worker and its private temporary folder."""

    def __init__(self, python: Optional[str] = None):
        import FewShotSegLib

        self.folder = tempfile.mkdtemp(prefix="FewShotSeg-worker-")
        self.logPath = os.path.join(self.folder, "worker.log")
        script = Path(__file__).resolve().with_name("worker.py")
        paths = [str(Path(FewShotSegLib.__file__).resolve().parents[1]), str(script.parents[1])]
        command = [python or workerPython(), str(script)]
        for path in paths:
            command += ["--path", path]
        options = {}
        if os.name == "nt":
            options["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            with open(self.logPath, "wb") as log:
                self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                             bufsize=0, **options)
        except OSError as exc:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise FewShotSegError(f"could not start the FewShotSeg worker ({command[0]}): {exc}") from None
        self.reader = _PipeReader(self.proc.stdout)
        self.pid: Optional[int] = None   # the interpreter's own pid (PythonSlicer may be a launcher)
        self.heldVolume: Optional[str] = None
        self.lastId = 0
        self.warm = None   # True once a warm-up load answered (or its error text)
        self.devices: Optional[list] = None   # as the worker listed them when it started

    def send(self, message: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise WorkerStopped(self.stoppedMessage()) from None

    def messages(self) -> list[dict]:
        out = []
        for message in self.reader.messages():
            if message.get("type") == "ready":
                self.pid = int(message.get("pid", 0)) or None
            elif message.get("type") == "loaded":
                self.warm = message.get("error") or True
            elif message.get("type") == "devices":
                self.devices = [str(d) for d in message.get("devices") or ["cpu"]]
            else:
                out.append(message)
        return out

    @property
    def stopped(self) -> bool:
        return self.reader.eof or self.proc.poll() is not None

    def stoppedMessage(self) -> str:
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        code = self.proc.poll()
        lines = [line.strip() for line in self.logTail().splitlines() if line.strip()]
        last = f" Last words: {lines[-1][:300]}. Its log: {self.logPath}" if lines else ""
        return (f"the FewShotSeg worker stopped unexpectedly (exit code {code if code is not None else 'unknown'}); "
                f"the segmentation was not changed.{last}")

    def logTail(self, chars: int = 2000) -> str:
        try:
            return Path(self.logPath).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        kill = getattr(signal, "SIGKILL", signal.SIGTERM)
        if self.pid and self.pid != self.proc.pid:
            try:
                os.kill(self.pid, kill)
            except OSError:
                pass
        try:
            self.proc.kill()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def close(self, keepLog: bool = False) -> None:
        """Ask it to quit, kill it if it does not, and remove the temporary folder (all but
        a non-empty log when ``keepLog``: a crash's message points to it)."""
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.stdin.close()
                self.proc.wait(QUIT_GRACE_SECONDS)
            except (FewShotSegError, OSError, subprocess.TimeoutExpired):
                self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        if not keepLog or not self.logTail(1):      # an empty log says nothing: keep nothing
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        for path in Path(self.folder).iterdir():
            if path.name != Path(self.logPath).name:
                try:
                    path.unlink()
                except OSError:
                    pass


class JobHandle:
    """A job running in the worker. ``poll()`` (non-blocking) until it returns True, then
    ``outcome()`` gives the result or raises its error; or ``follow()``, blocking."""

    what = "job"

    def __init__(self, client: "WorkerClient", worker: WorkerProcess, jobId: int, job, files: list):
        self.client, self.worker, self.jobId, self.job, self.files = client, worker, jobId, job, files
        self.fraction, self.message = 0.0, "starting"
        self.finished = False
        self.result = None
        self.error: Optional[BaseException] = None
        self.errorTrace = ""
        self.cancelRequested = False
        self._cancelAt = None
        self.started = time.perf_counter()

    def _end(self, result=None, error: Optional[BaseException] = None, trace: str = "") -> None:
        self.result, self.error, self.errorTrace, self.finished = result, error, trace, True
        for path in self.files:
            try:
                os.remove(path)
            except OSError:
                pass
        self.client._ended(self)

    def _cancelled(self) -> FewShotSegError:
        raise NotImplementedError

    def _readResult(self, message: dict):
        """The job's result from its "done" message (files removed once read)."""
        raise NotImplementedError

    def _mask(self, message: dict) -> np.ndarray:
        from FewShotSegSlicerLib.worker import unpack

        mask = unpack(message["mask"], tuple(self.job.support.shape))
        os.remove(message["mask"])
        return mask

    def poll(self) -> bool:
        if self.finished:
            return True
        for message in self.worker.messages():
            if message.get("id") != self.jobId:
                continue
            kind = message.get("type")
            if kind == "progress":
                self.fraction = max(0.0, min(1.0, float(message.get("fraction", 0.0))))
                self.message = str(message.get("message", ""))
            elif kind == "done":
                try:
                    result = self._readResult(message)
                except (OSError, ValueError, KeyError) as exc:
                    self._end(error=FewShotSegError(f"could not read the worker's result: {exc}; "
                                                    "the segmentation was not changed"))
                    return True
                self._end(result=result)
                return True
            elif kind == "error":
                if message.get("kind") == "cancelled":
                    error = self._cancelled()
                elif message.get("kind") == "fewshot":
                    error = FewShotSegError(message.get("message", f"{self.what} failed"))
                else:
                    self.worker.heldVolume = None  # a failure while loading: send it again next time
                    error = FewShotSegError(f"{self.what} failed: {message.get('message', '')}")
                self._end(error=error, trace=message.get("trace", ""))
                return True
        if self.worker.stopped:
            message, trace = self.worker.stoppedMessage(), self.worker.logTail()
            self.client.discard(self.worker, keepLog=not self.cancelRequested)
            self._end(error=self._cancelled() if self.cancelRequested else WorkerStopped(message), trace=trace)
            return True
        if self.cancelRequested and time.perf_counter() - self._cancelAt > CANCEL_GRACE_SECONDS:
            self.client.discard(self.worker)  # it did not answer: kill it, the next job starts a new one
            self._end(error=self._cancelled())
            return True
        return False

    def status(self) -> tuple[float, str]:
        return self.fraction, self.message

    def cancel(self) -> None:
        if self.finished or self.cancelRequested:
            return
        self.cancelRequested, self._cancelAt = True, time.perf_counter()
        try:
            self.worker.send({"cmd": "cancel", "id": self.jobId})
        except FewShotSegError:
            pass  # already gone: poll() reports it

    def wait(self, timeout: Optional[float] = None, interval: float = 0.02) -> bool:
        """Blocking poll loop for scripts and tests."""
        end = None if timeout is None else time.perf_counter() + timeout
        while not self.poll():
            if end is not None and time.perf_counter() > end:
                return False
            time.sleep(interval)
        return True

    def outcome(self):
        if not self.finished:
            raise FewShotSegError(f"the {self.what} has not finished yet")
        if self.error is not None:
            raise self.error
        return self.result

    def follow(self, progress=None, cancel=None, interval: float = 0.02):
        """Blocking, for scripts and tests: poll until it ends, reporting ``progress(fraction,
        message)`` and cancelling once ``cancel()`` is true; returns the outcome."""
        while not self.poll():
            if progress:
                progress(self.fraction, self.message)
            if cancel and cancel():
                self.cancel()
            time.sleep(interval)
        if progress and self.error is None:
            progress(self.fraction, self.message)
        return self.outcome()


class PropagationHandle(JobHandle):
    """A propagation running in the worker; its result is an engine.EngineResult."""

    what = "propagation"

    def _cancelled(self):
        from FewShotSegLib.propagation import PropagationCancelled

        return PropagationCancelled("propagation cancelled; the segmentation was not changed")

    def _readResult(self, message: dict):
        from FewShotSegSlicerLib.engine import EngineResult

        return EngineResult(self._mask(message), message.get("result", {}))


class RefineHandle(JobHandle):
    """A refinement running in the worker; its result an engine.EngineResult with the
    uncertainty (float32, volume array order)."""

    what = "refinement"

    def _cancelled(self):
        from FewShotSegLib.refinement.sampling import RefineCancelled

        return RefineCancelled("refinement cancelled; the segmentation was not changed")

    def _readResult(self, message: dict):
        from FewShotSegSlicerLib.engine import EngineResult
        from FewShotSegSlicerLib.worker import loadBox

        mask = self._mask(message)
        uncertainty = loadBox(message.get("uncertainty"), message.get("box"), mask.shape)
        if message.get("uncertainty"):
            os.remove(message["uncertainty"])
        return EngineResult(mask, message.get("result", {}), uncertainty)


class StructuresHandle(PropagationHandle):
    """Several segments propagated in one run; its result is one engine.EngineResult per
    segment of the job, in order (mask: that segment's label in the returned label map)."""

    def _readResult(self, message: dict):
        from FewShotSegSlicerLib.engine import EngineResult

        labels = np.load(message["labels"])
        os.remove(message["labels"])
        shape = tuple(self.job.support.shape)
        if labels.shape != shape:
            raise ValueError(f"label map of shape {labels.shape}, expected {shape}")
        fields = message.get("result", {})
        return [EngineResult(labels == value, part) for value, part in enumerate(fields.get("parts", []), start=1)]


class WorkerClient:
    """Owns at most one worker process and one running job."""

    def __init__(self, python: Optional[str] = None):
        self.python = python
        self.worker: Optional[WorkerProcess] = None
        self.current: Optional[JobHandle] = None

    @property
    def busy(self) -> bool:
        """A job is running. Polls it (non-blocking), so a job nobody polls any more (its
        panel was closed) still ends, and a cancel past its grace time still kills."""
        if self.current is not None and not self.current.finished:
            self.current.poll()
        return self.current is not None and not self.current.finished

    def ensureWorker(self) -> WorkerProcess:
        if self.worker is not None and self.worker.stopped:
            self.discard(self.worker)
        if self.worker is None:
            self.worker = WorkerProcess(self.python)
        return self.worker

    def start(self, job, volumeArray, geometry: dict, volumeKey: str, sessionKey: str) -> PropagationHandle:
        """Send a propagation; the volume only if the worker does not hold it."""
        return self._submit(PropagationHandle, job, volumeArray, geometry, volumeKey, {
            "cmd": "job", "support": job.support, "exclude": job.exclude, "editable": job.editable,
            "sessionKey": sessionKey,
            "model": str(job.modelPath), "mode": job.mode, "axisIndex": int(job.axisIndex),
            "intensityGate": bool(job.intensityGate), "walkStepMm": float(job.walkStepMm)})

    def startStructures(self, job, volumeArray, geometry: dict, volumeKey: str, sessionKey: str) -> StructuresHandle:
        """Send several segments' propagation (a segmentslogic.SegmentsJob) as one job."""
        first = job.jobs[0]
        return self._submit(StructuresHandle, job, volumeArray, geometry, volumeKey, {
            "cmd": "structures", "sessionKey": sessionKey, "model": str(first.modelPath), "mode": first.mode,
            "intensityGate": bool(first.intensityGate), "walkStepMm": float(first.walkStepMm),
            "parts": [{"support": j.support, "exclude": j.exclude, "editable": j.editable,
                       "axisIndex": int(j.axisIndex), "name": name} for j, name in zip(job.jobs, job.names())]})

    def startRefine(self, job, volumeArray, geometry: dict, volumeKey: str) -> RefineHandle:
        """Send a refinement (refinement.RefineJob); the volume only if the worker does not hold it."""
        return self._submit(RefineHandle, job, volumeArray, geometry, volumeKey, {
            "cmd": "refine", "coarse": job.coarse, "keep": job.keep, "refiner": str(job.refinerPath),
            "samples": int(job.samples), "steps": int(job.steps)})

    def _submit(self, handleClass, job, volumeArray, geometry: dict, volumeKey: str, fields: dict) -> JobHandle:
        """One job: bool arrays in ``fields`` travel as packed .npy files (None stays None)."""
        if self.busy:
            raise FewShotSegError("a propagation or refinement is already running: wait for it or cancel it")
        worker = self.ensureWorker()
        worker.lastId += 1
        jobId = worker.lastId
        files = []

        def save(name, array):
            path = os.path.join(worker.folder, f"{name}-{jobId}.npy")
            np.save(path, array)
            files.append(path)
            return path

        message = {"id": jobId, "volumeKey": volumeKey, "volume": None, "geometry": geometry,
                   "shape": list(job.support.shape), "device": job.device, "axisName": job.axis,
                   "out": worker.folder}
        def packed(name, value):
            if isinstance(value, np.ndarray):
                return save(name, np.packbits(value.astype(bool, copy=False)))
            if isinstance(value, list):      # parts of a several-segment job
                return [{key: packed(f"{name}{k}-{key}", v) for key, v in part.items()}
                        for k, part in enumerate(value)]
            return value

        for name, value in fields.items():
            message[name] = packed(name, value)
        if worker.heldVolume != volumeKey:
            message["volume"] = save("volume", volumeArray)
        try:
            worker.send(message)
        except FewShotSegError:
            self.discard(worker, keepLog=True)  # removes the arrays written for this job, keeps the log
            raise
        worker.heldVolume = volumeKey
        self.current = handleClass(self, worker, jobId, job, files)
        return self.current

    def warmUp(self, modelPath, device: str = "cpu") -> None:
        """Start the worker and load the model now, so the first Propagate does not wait for
        it (the effect calls this when it is chosen). Never raises."""
        if self.busy:
            return
        try:
            self.ensureWorker().send({"cmd": "load", "id": "warm", "model": str(modelPath), "device": device})
        except (FewShotSegError, OSError):
            pass

    def devices(self) -> Optional[list]:
        """The devices the running worker listed (None before it did, or with no worker).
        Never blocks; a running job's poll reads the message too."""
        if self.worker is None:
            return None
        if self.current is None and self.worker.devices is None:
            self.worker.messages()
        return None if self.worker.devices is None else list(self.worker.devices)

    def waitWarm(self, timeout: float = 120.0) -> bool:
        """Blocking, for scripts and benchmarks: True once the warm-up load answered."""
        end = time.perf_counter() + timeout
        while self.worker is not None and self.worker.warm is None and time.perf_counter() < end:
            if self.current is None:
                self.worker.messages()
            time.sleep(0.02)
        return self.worker is not None and self.worker.warm is True

    def _ended(self, handle: JobHandle) -> None:
        if self.current is handle:
            self.current = None

    def discard(self, worker: Optional[WorkerProcess] = None, keepLog: bool = False) -> None:
        """Kill a worker (the current one by default); the next job starts a fresh one."""
        worker = worker or self.worker
        if worker is None:
            return
        worker.kill()
        worker.close(keepLog)
        if worker is self.worker:
            self.worker = None

    def shutdown(self) -> None:
        if self.current is not None and not self.current.finished:
            self.current.cancel()
        if self.worker is not None:
            self.worker.close()
            self.worker = None
