"""Apply -> filled segment in Slicer's main loop, against the command line's time.

Slicer's main loop does not release the GIL between events; the GUI polls a running job
every 100 ms. This runs the module's Logic on real MRML (PyPI slicer-core) with the main
thread holding the GIL between 100 ms polls (ctypes.PyDLL usleep), as the Propagate
button does: prepare, start the job in the worker process, poll, write the segment. Cases:
the MRI and the CT of benchmarks/speed_benchmark.py (liver painted on its largest slice).

For each case, each in a fresh process:
  cli_s        `python -m FewShotSegLib.cli propagate` wall time (start, load, propagate, write)
  logic_s      the first Propagate of a Slicer session: the worker process starts, loads the
               model and the volume (what a user waits for on the first click)
  logic_warm_s a Propagate with the worker running, on a volume it does not hold yet
  logic_prestarted_s  the first Propagate after the effect was chosen (the worker started and
               loaded the model while the user painted), on a volume it does not hold yet
  thread_s     (--thread) the old way: compute on a Python thread of Slicer's interpreter
Target: logic_s <= 1.2 x cli_s. On a shared machine wall times swing with the load, so each
kind is timed --repeat times (interleaved) and the fastest kept, and CPU seconds are given too
(*_cpu_s: the CLI process; this process plus the worker's job, plus the worker's start-up
for the click that started it). Writes benchmarks/results/slicer_main_loop.json (or --out).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "FewShotSeg"), str(ROOT / "benchmarks")]

POLL_SECONDS = 0.1
TARGET_RATIO = 1.2


def _childrenCpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def holdGilLoop(finished) -> None:
    """Slicer's main loop: between two 100 ms timer ticks the main thread waits in C++ code
    that keeps the GIL."""
    usleep = ctypes.PyDLL(None).usleep
    while not finished():
        usleep(int(POLL_SECONDS * 1e6))


def _logicChild(image: str, support: str, mode: str, out: str, thread: bool) -> None:
    """In a fresh process: Apply -> filled segment through the Logic, as the GUI runs it."""
    import numpy as np

    from FewShotSegSlicerLib.headless import SlicerCore
    from FewShotSegSlicerLib.logic import FewShotSegLogic, segmentationHistory
    from FewShotSegSlicerLib.tasks import BackgroundTask

    core = SlicerCore()
    volume = core.load(image)
    seg = core.segmentation(volume)
    labels = core.load(support, labelmap=True)
    segmentId = core.importLabels(labels, seg)[1]
    core.scene.RemoveNode(labels)
    logic = FewShotSegLogic()
    history = segmentationHistory(seg)
    results = {}

    def click(key: str, workerStartup: bool) -> None:
        history.SaveState()
        start, startCpu = time.perf_counter(), time.process_time()
        job = logic.prepare(volume, seg, segmentId, mode=mode, forWorker=True)
        handle = logic.startPropagation(job)
        holdGilLoop(handle.poll)
        result = handle.outcome()
        summary = logic.apply(job, result)
        results[key] = time.perf_counter() - start
        # CPU seconds: this process + the worker's job (+ its start-up when this click started it)
        workerCpu = result.worker_process_cpu_seconds if workerStartup else result.worker_cpu_seconds
        results[key.replace("_s", "_cpu_s")] = time.process_time() - startCpu + float(workerCpu)
        results[key.replace("_s", "_engine_s")] = float(result.seconds)
        results["slices_filled"] = summary.slicesFilled
        filled = np.asarray(result.mask, bool)
        results["voxels"] = int(filled.sum())
        assert history.RestorePreviousState()

    click("logic_s", True)                      # cold: the worker starts with this click
    volume.GetImageData().Modified()            # the worker must take the volume anew
    click("logic_warm_s", False)
    logic.shutdown()
    logic.warmUp()                              # the effect was chosen while the user painted
    assert logic.worker.waitWarm(300)
    volume.GetImageData().Modified()
    click("logic_prestarted_s", False)
    logic.shutdown()
    if thread:
        history.SaveState()
        start = time.perf_counter()
        job = logic.prepare(volume, seg, segmentId, mode=mode)
        task = BackgroundTask(lambda progress, cancel: logic.compute(job, progress, cancel)).start()
        holdGilLoop(lambda: task.finished)
        if task.error is not None:
            raise task.error
        logic.apply(job, task.result)
        results["thread_s"] = time.perf_counter() - start
    Path(out).write_text(json.dumps(results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MRI only")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/slicer_main_loop.json)")
    parser.add_argument("--mode", default="chained")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest of each kind is kept")
    parser.add_argument("--thread", action="store_true", help="also time the old Python-thread path (slow)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--logic-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.logic_child:
        _logicChild(args.logic_child[0], args.logic_child[1], args.mode, args.logic_child[2], args.thread)
        return

    import torch

    from FewShotSegLib.evaluation import shared_data_dir, write_json
    from speed_benchmark import TARGETS, make_cases
    from Training.provenance import hardware

    cases = [name for name in TARGETS if not args.quick or name.startswith("mri")]
    report = {"hardware": f"{hardware(torch.device('cpu'), 1)}, torch {torch.__version__}",
              "mode": args.mode, "poll_seconds": POLL_SECONDS, "repeat": args.repeat,
              "target_ratio": TARGET_RATIO, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_cases(shared_data_dir(args.data), work)
        for name in cases:
            image, support = work / f"{name}.nii.gz", work / f"{name}_support.nii.gz"
            best: dict = {}
            for _ in range(args.repeat):
                t0, cpu0 = time.perf_counter(), _childrenCpu()
                subprocess.run([sys.executable, "-m", "FewShotSegLib.cli", "propagate", str(image), "--support",
                                str(support), "--mode", args.mode, "-q", "-o", str(work / f"{name}_out.nii.gz")],
                               check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                cli, cliCpu = time.perf_counter() - t0, _childrenCpu() - cpu0
                out = work / f"{name}_logic.json"
                subprocess.run([sys.executable, __file__, "--mode", args.mode, "--logic-child", str(image),
                                str(support), str(out)] + (["--thread"] if args.thread else []), check=True)
                run = {"cli_s": cli, "cli_cpu_s": cliCpu, **json.loads(out.read_text())}
                for key, value in run.items():
                    if key.endswith("_s"):
                        best[key] = min(best.get(key, value), value)
                    else:
                        best[key] = value
            row = {"case": name, "cli_s": round(best["cli_s"], 3), "logic_s": round(best["logic_s"], 3),
                   "ratio": round(best["logic_s"] / best["cli_s"], 3),
                   **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in best.items()
                      if k not in ("cli_s", "logic_s")}}
            row["cpu_ratio"] = round(best["logic_cpu_s"] / best["cli_cpu_s"], 3)
            row["prestarted_ratio"] = round(best["logic_prestarted_s"] / best["cli_s"], 3)
            if "thread_s" in best:
                row["thread_ratio"] = round(best["thread_s"] / best["cli_s"], 3)
            report["cases"].append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "slicer_main_loop.json"
    write_json(out, report)
    print(f"written {out}")


if __name__ == "__main__":
    main()
