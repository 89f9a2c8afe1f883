"""The FewShotSeg worker process: loads a model once and propagates or refines on request.

Why a process: Slicer's main loop holds the GIL between events, so a Python thread in
Slicer's interpreter runs only when the GUI happens to run Python (a 2.5 s propagation
took 55 s; refinement likewise). This process is started with Slicer's own Python (PythonSlicer, as
SlicerMONAIAuto3DSeg and SlicerTotalSegmentator run theirs) and imports only the engine,
NumPy and SimpleITK: no Slicer, no Qt.

Protocol (one JSON object per line). In, on stdin::

    {"cmd": "job", "id": 1, "volumeKey": "...", "volume": "v.npy" | null, "geometry": {...},
     "support": "s.npy", "exclude": "e.npy" | null, "editable": "a.npy" | null, "sessionKey": "...", "model": "m.pt",
     "device": "cpu", "mode": "chained", "axisIndex": 0, "axisName": "axial",
     "intensityGate": true, "walkStepMm": 0.0, "out": "folder"}
    {"cmd": "refine", "id": 2, "volumeKey": "...", "volume": ..., "geometry": {...}, "shape": [...],
     "coarse": "c.npy", "keep": "k.npy" | null, "refiner": "r.pt", "device": "cpu",
     "samples": 4, "steps": 4, "axisName": "axial", "out": "folder"}
    {"cmd": "structures", "id": 3, ... as "job", but "parts": [{"support": "s0.npy", "exclude": ..., "editable": ...,
     "axisIndex": 0}, ...] instead of one support}     (several segments at once)
    {"cmd": "load", "id": "warm", "model": "m.pt", "device": "cpu"}   (load before the first job)
    {"cmd": "cancel", "id": 1}
    {"cmd": "quit"}                      (or stdin closed)

Out, on the original stdout (anything the engine prints goes to stderr)::

    {"type": "ready", "pid": 123}
    {"type": "devices", "devices": ["cpu", "cuda"]}      (once, before the first job is taken)
    {"type": "progress", "id": 1, "fraction": 0.4, "message": "..."}
    {"type": "loaded", "id": "warm"}
    {"type": "done", "id": 1, "mask": "folder/mask-1.npy", "result": {...}}
    {"type": "done", "id": 2, "mask": "...", "uncertainty": "folder/uncertainty-2.npy" | null,
     "box": [[k0, k1], [j0, j1], [i0, i1]], "result": {...}}     (a refine: the uncertainty's box)
    {"type": "done", "id": 3, "labels": "folder/labels-3.npy", "result": {"parts": [{...}, ...], ...}}
    {"type": "error", "id": 1, "kind": "cancelled" | "fewshot" | "other", "message": "...", "trace": "..."}

Arrays travel as .npy files in the client's private temporary folder ("shape" gives the
volume's; masks are np.packbits of the flattened bool array; the uncertainty is the float32
box holding its non-zero voxels, none when it is zero everywhere). The volume is sent only
when this process does not hold it already, for a propagation or a refinement alike; the
PropagationSession of the held volume is kept, so a re-propagation after a correction
recomputes only what changed. One few-shot model and one refiner are kept loaded.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import traceback

PROGRESS_INTERVAL = 0.05  # seconds between two progress lines


def unpack(path: str, shape):
    """A bool array sent as np.packbits (8x smaller than bool, far smaller than uint8)."""
    import numpy as np

    count = int(np.prod(shape))
    return np.unpackbits(np.load(path), count=count).reshape(shape).view(bool)


def saveMask(job: dict, mask) -> str:
    """A result mask as np.packbits in the job's folder; returns its path."""
    import numpy as np

    path = os.path.join(job["out"], f"mask-{job['id']}.npy")
    np.save(path, np.packbits(np.asarray(mask) > 0))
    return path


def saveBox(path: str, array):
    """Save the box of ``array`` that holds its non-zero values; returns the box
    ([[start, stop] per axis]), or None (nothing saved) when it is zero everywhere."""
    import numpy as np

    if not array.any():
        return None
    box = []
    for axis in range(array.ndim):
        hits = np.flatnonzero(array.any(axis=tuple(a for a in range(array.ndim) if a != axis)))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    np.save(path, np.ascontiguousarray(array[tuple(slice(a, b) for a, b in box)]))
    return box


def loadBox(path, box, shape, dtype="float32"):
    """The full array back from saveBox's file and box (zeros outside the box)."""
    import numpy as np

    out = np.zeros(shape, dtype)
    if box:
        out[tuple(slice(a, b) for a, b in box)] = np.load(path)
    return out


def torchDevices() -> list:
    """cpu, then cuda / mps where this PyTorch build can use them. Listed here, not in
    Slicer's process: importing PyTorch takes seconds, a frozen GUI when a panel opens."""
    devices = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            devices.append("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            devices.append("mps")
    except Exception:  # no PyTorch, or a broken one: the job that needs it reports that
        pass
    return devices


class Worker:
    def __init__(self, out):
        self.out = out
        self.outLock = threading.Lock()
        self.jobs: "queue.Queue[dict | None]" = queue.Queue()
        self.cancelled = set()
        self.models = {}           # checkpoint kind ("fewshot", "refiner") -> (key, checkpoint)
        self.volume = None         # (key, SimpleITK image)
        self.sessions = {}         # session key -> PropagationSession, for the held volume only
        self.devices = None        # listed once, when serving starts

    def send(self, message: dict) -> None:
        with self.outLock:
            self.out.write((json.dumps(message) + "\n").encode())
            self.out.flush()

    # -- stdin, on a thread: a cancel must arrive while a job runs ---------------------------
    def readCommands(self, stream) -> None:
        for line in stream:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            command = message.get("cmd")
            if command == "cancel":
                self.cancelled.add(message.get("id"))
            elif command in ("job", "structures", "refine", "load"):
                self.jobs.put(message)
            elif command == "quit":
                break
        self.cancelled.add("*")
        self.jobs.put(None)

    # -- jobs ------------------------------------------------------------------------------
    def loadModel(self, path: str, device: str, kind: str = "fewshot"):
        """The checkpoint, loaded once; one of each kind is kept."""
        from FewShotSegLib.checkpoints import PROPAGATION_KINDS, load_checkpoint

        key = (os.path.realpath(path), os.stat(path).st_mtime_ns, device)
        if self.devices is not None and device not in self.devices:
            from FewShotSegLib.errors import FewShotSegError

            raise FewShotSegError(f"device '{device}' is not available to PyTorch here "
                                  f"(available: {', '.join(self.devices)})")
        if kind not in self.models or self.models[kind][0] != key:
            self.models.pop(kind, None)  # free the previous one before loading
            accepted = PROPAGATION_KINDS if kind == "fewshot" else kind   # the propagation's model: either kind
            self.models[kind] = (key, load_checkpoint(path, expect_kind=accepted, device=device))
        return self.models[kind][1]

    def loadVolume(self, job: dict):
        import numpy as np
        import SimpleITK as sitk

        if job.get("volume"):
            self.volume, self.sessions = None, {}
            image = sitk.GetImageFromArray(np.load(job["volume"]))
            geometry = job["geometry"]
            image.SetOrigin(geometry["origin"])
            image.SetSpacing(geometry["spacing"])
            image.SetDirection(geometry["direction"])
            self.volume = (job["volumeKey"], image)
        if self.volume is None or self.volume[0] != job["volumeKey"]:
            raise RuntimeError("the worker does not hold this volume (protocol error)")
        return self.volume[1]

    def session(self, key: str):
        from FewShotSegSlicerLib.engine import newSession

        if key not in self.sessions:
            self.sessions[key] = newSession()
        return self.sessions[key]

    def propagate(self, job: dict, image, progress, cancel) -> dict:
        from FewShotSegLib.propagation import PropagationCancelled
        from FewShotSegSlicerLib import engine

        model = self.loadModel(job["model"], job["device"])
        if cancel():
            raise PropagationCancelled("propagation cancelled; the segmentation was not changed")
        support = unpack(job["support"], job["shape"])
        exclude = unpack(job["exclude"], job["shape"]) if job.get("exclude") else None
        editable = unpack(job["editable"], job["shape"]) if job.get("editable") else None
        result = engine.run(image, support, model, job["mode"], job["axisIndex"], job["axisName"],
                            job["device"], job["intensityGate"], exclude=exclude, editable=editable,
                            session=self.session(job["sessionKey"]), progress=progress, cancel=cancel,
                            walkStepMm=float(job.get("walkStepMm", 0.0)))
        return {"mask": saveMask(job, result.mask), "result": engine.summary(result)}

    def structures(self, job: dict, image, progress, cancel) -> dict:
        """Several segments in one run (engine.runStructures); the label map comes back."""
        import numpy as np

        from FewShotSegLib.propagation import PropagationCancelled
        from FewShotSegSlicerLib import engine

        model = self.loadModel(job["model"], job["device"])
        if cancel():
            raise PropagationCancelled("propagation cancelled; the segmentation was not changed")
        shape = job["shape"]
        parts = [{"support": unpack(part["support"], shape), "axisIndex": part["axisIndex"], "name": part.get("name"),
                  "exclude": unpack(part["exclude"], shape) if part.get("exclude") else None,
                  "editable": unpack(part["editable"], shape) if part.get("editable") else None}
                 for part in job["parts"]]
        result = engine.runStructures(image, parts, model, job["mode"], job["device"], job["intensityGate"],
                                      session=self.session(job["sessionKey"]), progress=progress, cancel=cancel,
                                      walkStepMm=float(job.get("walkStepMm", 0.0)))
        path = os.path.join(job["out"], f"labels-{job['id']}.npy")
        np.save(path, result.labels)
        return {"labels": path, "result": {"seconds": float(result.seconds), "contested": int(result.contested),
                                           "parts": [engine.summary(result.results[v])
                                                     for v in range(1, len(parts) + 1)]}}

    def refine(self, job: dict, image, progress, cancel) -> dict:
        import numpy as np

        from FewShotSegLib.refinement.sampling import RefineCancelled
        from FewShotSegSlicerLib import engine

        refiner = self.loadModel(job["refiner"], job["device"], kind="refiner")
        if cancel():
            raise RefineCancelled("refinement cancelled; the segmentation was not changed")
        coarse = unpack(job["coarse"], job["shape"])
        keep = unpack(job["keep"], job["shape"]) if job.get("keep") else None
        result = engine.refine(image, coarse, keep, refiner, job["samples"], job["steps"], job["axisName"],
                               job["device"], progress=progress, cancel=cancel)
        uncertainty = os.path.join(job["out"], f"uncertainty-{job['id']}.npy")
        box = saveBox(uncertainty, np.asarray(result.uncertainty, np.float32))
        return {"mask": saveMask(job, result.mask), "uncertainty": uncertainty if box else None, "box": box,
                "result": engine.summary(result)}

    def run(self, job: dict) -> None:
        from FewShotSegLib.errors import FewShotSegError
        from FewShotSegLib.propagation import PropagationCancelled
        from FewShotSegLib.refinement.sampling import RefineCancelled

        jobId = job["id"]
        refining = job.get("cmd") == "refine"
        started, startedCpu = time.perf_counter(), time.process_time()
        last = [0.0]

        def progress(fraction, message=""):
            now = time.perf_counter()
            if now - last[0] >= PROGRESS_INTERVAL or fraction >= 1.0:
                last[0] = now
                self.send({"type": "progress", "id": jobId, "fraction": float(fraction), "message": str(message)})

        def cancel():
            return jobId in self.cancelled or "*" in self.cancelled

        try:
            progress(0.0, "loading the volume" if job.get("volume") else
                     "loading the refiner" if refining else "loading the model")
            image = self.loadVolume(job)
            run = {"refine": self.refine, "structures": self.structures}.get(job.get("cmd"), self.propagate)
            answer = run(job, image, progress, cancel)
            fields = answer["result"]
            fields["worker_seconds"] = time.perf_counter() - started  # from the job's arrival to its answer
            fields["worker_cpu_seconds"] = time.process_time() - startedCpu
            fields["worker_process_cpu_seconds"] = time.process_time()  # since this process started
            self.send({"type": "done", "id": jobId, **answer})
        except (PropagationCancelled, RefineCancelled) as exc:
            self.send({"type": "error", "id": jobId, "kind": "cancelled", "message": str(exc)})
        except FewShotSegError as exc:
            self.send({"type": "error", "id": jobId, "kind": "fewshot", "message": str(exc)})
        except Exception as exc:  # reported to the GUI with its trace; the worker lives on
            self.send({"type": "error", "id": jobId, "kind": "other", "message": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc()})
        finally:
            self.cancelled.discard(jobId)

    def warmUp(self, job: dict) -> None:
        """Load the model before the first job (the user is still painting)."""
        try:
            self.loadModel(job["model"], job["device"])
            self.send({"type": "loaded", "id": job.get("id")})
        except Exception as exc:  # the job that needs the model will report it
            self.send({"type": "loaded", "id": job.get("id"), "error": f"{type(exc).__name__}: {exc}"})

    def serve(self) -> None:
        self.devices = torchDevices()
        self.send({"type": "devices", "devices": self.devices})
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.get("cmd") == "load":
                self.warmUp(job)
            else:
                self.run(job)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    while "--path" in argv:  # folders holding FewShotSegLib and FewShotSegSlicerLib
        i = argv.index("--path")
        sys.path.insert(0, argv[i + 1])
        del argv[i:i + 2]
    # The protocol owns the original stdout; prints from any library go to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    worker = Worker(out)
    worker.send({"type": "ready", "pid": os.getpid()})
    reader = threading.Thread(target=worker.readCommands, args=(sys.stdin.buffer,), daemon=True)
    reader.start()
    worker.serve()
    return 0


if __name__ == "__main__":
    # Run as a script, this file's own folder is sys.path[0]: its geometry.py, models.py ...
    # must not shadow top-level modules. The module folder goes there instead.
    libFolder = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != libFolder]
    here = os.path.dirname(libFolder)
    if here not in sys.path:
        sys.path.insert(0, here)
    sys.exit(main())
