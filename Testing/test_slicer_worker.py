"""Corrections, the worker process and Slicer's GIL-holding main loop, on real MRML.

Why these tests: in Slicer the Logic must (1) keep what the user drew across runs, so a
correction is kept and the engine-filled slices are refilled, saved with the scene and
undone with the segment; (2) compute in a worker process, since Slicer's main loop holds
the GIL between events (a Python thread ran 20x slower); (3) survive the worker being
cancelled, killed or asked twice, leaving the segmentation exactly as it was. Everything
runs on PyPI's slicer-core with a real CHAOS volume. Needs ../shared/data; skips without.
"""
from __future__ import annotations

import ctypes
import os
import signal
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "FewShotSeg"), str(ROOT), str(Path(__file__).resolve().parent)]

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("torch")

from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegSlicerLib import geometry, userslices  # noqa: E402
from FewShotSegSlicerLib.logic import FewShotSegLogic, segmentationHistory  # noqa: E402
from FewShotSegSlicerLib.workerclient import WorkerStopped  # noqa: E402
from test_slicer_logic import (LIVER, assertSameSegments, chaos, core, data_dir, dice,  # noqa: E402,F401
                               private_model_home, scene, snapshot, tiny_checkpoint)

POLL_SECONDS = 0.1
SHIPPED = ROOT / "Resources" / "Models" / "fewshotseg-default.pt"


@pytest.fixture(scope="module")
def logic():
    logic = FewShotSegLogic()
    yield logic
    logic.shutdown()


def mainLoop(handle, timeout: float = 600.0) -> float:
    """Slicer's main loop as the GUI runs it: a 100 ms timer, and between two polls the main
    thread waits in C code that keeps the GIL (PyDLL does not release it)."""
    usleep = ctypes.PyDLL(None).usleep
    start = time.perf_counter()
    while not handle.poll():
        usleep(int(POLL_SECONDS * 1e6))
        assert time.perf_counter() - start < timeout, "the job did not finish"
    return time.perf_counter() - start


def waitForProgress(handle, above: float = 0.0, timeout: float = 300.0) -> None:
    start = time.perf_counter()
    while handle.fraction <= above:
        assert not handle.poll(), f"finished before reaching {above}: {handle.error}"
        time.sleep(0.02)
        assert time.perf_counter() - start < timeout


def killMidRun(handle):
    """Kill the worker once the job reported progress, poll as the GUI does: one clear
    message. Returns the killed worker."""
    waitForProgress(handle, 0.0)
    worker = handle.worker
    os.kill(worker.pid or worker.proc.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    mainLoop(handle, timeout=60)
    with pytest.raises(WorkerStopped, match=r"^the FewShotSeg worker stopped unexpectedly \(exit code -?\d+\); "
                                            r"the segmentation was not changed\."):
        handle.outcome()
    return worker


def userSlicesOf(chaos) -> list:
    return userslices.read(chaos.seg, chaos.liver).user


def saveAndReload(scene, segmentation, folder: Path):
    """Write the segmentation as .seg.nrrd and read it into a new node (Slicer's storage node)."""
    path = folder / "reloaded.seg.nrrd"
    storage = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    reloaded = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(reloaded)
    return reloaded


# -- what the user drew ------------------------------------------------------------------------
@pytest.mark.parametrize("inWorker", [False, True], ids=["in-process", "worker"])
def test_correction_keeps_user_slices_and_refills_the_rest(logic, scene, chaos, tiny_checkpoint, tmp_path, inWorker):
    """Paint one slice, propagate; paint another slice exactly and erase a third, propagate:
    both painted slices exact, the erased one empty, every other slice refilled as a fresh
    engine run with those anchors gives; the spleen untouched; one undo state per run; the
    record survives .seg.nrrd save + reload and Undo."""
    history = segmentationHistory(chaos.seg)
    saves = []
    undo = lambda: saves.append(history.SaveState())  # noqa: E731
    spleenBefore = snapshot(chaos.seg, chaos.image)[chaos.spleen]
    first = logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct",
                            saveStateForUndo=undo, worker=inWorker)
    assert saves == [True] and first.paintedSlices == 1 and first.slicesFilled > 2
    assert userSlicesOf(chaos) == [chaos.k]
    afterFirst = geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image)
    recordAfterFirst = userslices.read(chaos.seg, chaos.liver).encode()

    filled = [int(i) for i in np.flatnonzero(afterFirst.any((1, 2))) if i != chaos.k]
    truthSlices = [int(i) for i in np.flatnonzero((chaos.label == LIVER).any((1, 2)))]
    corrected = next(i for i in truthSlices if abs(i - chaos.k) >= 3)
    erased = max(filled) if max(filled) != corrected else min(filled)
    edited = afterFirst.copy()
    edited[corrected] = chaos.label[corrected] == LIVER   # the user paints this slice exactly
    edited[erased] = False                                 # and erases this one
    geometry.writeSegment(chaos.seg, chaos.liver, edited, chaos.image)

    second = logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct",
                             saveStateForUndo=undo, worker=inWorker)
    assert saves == [True, True]
    result = geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image)
    assert np.array_equal(result[chaos.k], chaos.painted[chaos.k])
    assert np.array_equal(result[corrected], chaos.label[corrected] == LIVER)
    assert not result[erased].any()
    assert second.paintedSlices == 2 and second.endSlices == 1
    assert userSlicesOf(chaos) == sorted({chaos.k, corrected, erased})

    # the engine-filled slices are refilled: the same as a fresh engine run from these anchors
    from FewShotSegLib.checkpoints import load_checkpoint
    from FewShotSegSlicerLib import engine

    support, exclude = userslices.supportAndExclude(edited, 0, [chaos.k, corrected, erased])
    fresh = engine.run(geometry.volumeToSitk(chaos.image), support, load_checkpoint(tiny_checkpoint), "direct", 0,
                       "axial", "cpu", True, exclude=exclude).mask > 0
    fresh |= support
    others = [i for i in range(result.shape[0]) if i not in (chaos.k, corrected, erased)]
    assert dice(result[others], fresh[others]) >= 0.99
    assert not np.array_equal(result[others], edited[others]) or np.array_equal(fresh[others], edited[others])
    assert np.array_equal(snapshot(chaos.seg, chaos.image)[chaos.spleen], spleenBefore)

    # saved and reloaded: the record comes back and nothing counts as edited
    reloaded = saveAndReload(scene, chaos.seg, tmp_path)
    assert userslices.read(reloaded, chaos.liver).encode() == userslices.read(chaos.seg, chaos.liver).encode()
    job = logic.prepare(chaos.image, reloaded, chaos.liver, model=tiny_checkpoint, mode="direct", forWorker=inWorker)
    assert job.userSlices == sorted({chaos.k, corrected, erased}) and job.editedSlices == []

    # Undo brings back the segment as it was before each run, with its record
    assert history.RestorePreviousState()
    assert np.array_equal(geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image), edited)
    assert userslices.read(chaos.seg, chaos.liver).encode() == recordAfterFirst
    assert history.RestorePreviousState()
    assert np.array_equal(geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image), chaos.painted)
    assert userslices.read(chaos.seg, chaos.liver) is None


def test_cleared_and_repainted_segment_starts_over(logic, chaos, tiny_checkpoint):
    """The user clears the propagated segment and paints another slice: a new start (the
    old slices are not taken as erased)."""
    logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct")
    other = next(i for i in np.flatnonzero((chaos.label == LIVER).any((1, 2))) if abs(i - chaos.k) >= 2)
    fresh = np.zeros_like(chaos.painted)
    fresh[other] = chaos.label[other] == LIVER
    geometry.writeSegment(chaos.seg, chaos.liver, fresh, chaos.image)
    job = logic.prepare(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct")
    assert job.userSlices == [int(other)] and job.exclude is None


def test_axis_follows_the_recorded_propagation(logic, chaos, tiny_checkpoint):
    """After a run every slice holds voxels; 'auto' keeps the painted plane (axial here)."""
    logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct")
    job = logic.prepare(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint)
    assert job.axis == "axial" and job.userSlices == [chaos.k]


# -- the worker process ---------------------------------------------------------------------------
def test_worker_gives_the_in_process_result(logic, chaos, tiny_checkpoint):
    history = segmentationHistory(chaos.seg)
    history.SaveState()
    logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct")
    inProcess = geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image)
    assert history.RestorePreviousState()
    logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct", worker=True)
    assert np.array_equal(geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image), inProcess)


@pytest.mark.skipif(not hasattr(slicer, "vtkSlicerSegmentEditorLogic"),
                    reason="this Slicer has no C++ segment editor logic (before 5.9)")
def test_worker_keeps_the_walks_inside_the_editable_area(logic, scene, chaos, tiny_checkpoint):
    """The editor's editable area travels to the worker: the same result as in process."""
    editor = scene.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    across = np.zeros_like(chaos.painted)
    across[chaos.k + 2] = chaos.label[chaos.k + 2] == LIVER
    geometry.writeSegment(chaos.seg, chaos.seg.GetSegmentation().AddEmptySegment("across"), across, chaos.image)
    history = segmentationHistory(chaos.seg)
    history.SaveState()
    logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct", editorNode=editor)
    inProcess = geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image)
    assert history.RestorePreviousState()
    logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct", worker=True,
                    editorNode=editor)
    inWorker = geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image)
    assert np.array_equal(inWorker, inProcess) and not (inWorker & across).any()


def test_main_loop_holding_the_gil_does_not_slow_the_worker(logic, chaos, tiny_checkpoint):
    """Polled every 100 ms by a main thread that keeps the GIL in between (Slicer's main
    loop), the user waits for the worker's own time plus the polling, not more (a Python
    thread in this process ran 20x slower under such a loop). Compared within one run, so
    the load of a shared machine does not matter."""
    logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct", worker=True)
    history = segmentationHistory(chaos.seg)  # the worker is started, its model loaded
    history.SaveState()
    chaos.image.GetImageData().Modified()     # the volume is sent again: no reuse of the last run
    start = time.perf_counter()
    job = logic.prepare(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="chained", forWorker=True)
    handle = logic.startPropagation(job)
    mainLoop(handle)
    result = handle.outcome()
    logic.apply(job, result)
    waited = time.perf_counter() - start
    print(f"\nworker {result.worker_seconds:.2f} s (engine {result.seconds:.2f} s); the user waited {waited:.2f} s "
          "under a GIL-holding 100 ms loop")
    assert result.worker_seconds > 0 and waited <= 1.1 * result.worker_seconds + 2 * POLL_SECONDS + 0.5


def test_cancel_mid_run_leaves_the_segmentation_and_the_worker_usable(logic, chaos):
    if not SHIPPED.is_file():
        pytest.skip("no shipped model: a tiny one finishes before a cancel can arrive")
    before = snapshot(chaos.seg, chaos.image)
    job = logic.prepare(chaos.image, chaos.seg, chaos.liver, mode="chained", forWorker=True)
    handle = logic.startPropagation(job)
    waitForProgress(handle, 0.05)
    worker = logic.worker.worker
    handle.cancel()
    mainLoop(handle, timeout=60)
    from FewShotSegLib.propagation import PropagationCancelled

    with pytest.raises(PropagationCancelled, match="cancelled"):
        handle.outcome()
    assertSameSegments(before, snapshot(chaos.seg, chaos.image))
    assert not logic.isBusy and logic.worker.worker is worker and not worker.stopped  # answered, not killed


def test_worker_killed_mid_run(logic, chaos, tiny_checkpoint):
    """One clear message, the segmentation exactly as before, and the next click works."""
    model = SHIPPED if SHIPPED.is_file() else tiny_checkpoint
    before = snapshot(chaos.seg, chaos.image)
    job = logic.prepare(chaos.image, chaos.seg, chaos.liver, model=model, mode="chained", forWorker=True)
    worker = killMidRun(logic.startPropagation(job))
    assertSameSegments(before, snapshot(chaos.seg, chaos.image))
    assert logic.worker.worker is None and not logic.isBusy
    # a killed worker wrote nothing to its log: its temporary folder is gone with it
    assert not Path(worker.folder).exists() or Path(worker.logPath).stat().st_size > 0
    summary = logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct", worker=True)
    assert summary.slicesFilled > 0 and logic.worker.worker is not worker


def test_warm_up_loads_the_model_before_the_first_click(tiny_checkpoint, chaos):
    logic = FewShotSegLogic()
    try:
        assert logic.warmUp(tiny_checkpoint)
        assert logic.worker.waitWarm(300)
        worker = logic.worker.worker
        summary = logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct",
                                  worker=True)
        assert summary.slicesFilled > 0 and logic.worker.worker is worker
        assert not logic.warmUp(Path(tiny_checkpoint).with_name("missing.pt"))
    finally:
        logic.shutdown()


DEVICES_WITHOUT_TORCH = r"""
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from FewShotSegSlicerLib.logic import FewShotSegLogic
logic = FewShotSegLogic()
assert logic.knownDevices() is None and logic.defaultDevice() == "cpu"   # no worker yet: not known, not imported
assert logic.warmUp(sys.argv[3])
end = time.time() + 300
while logic.knownDevices() is None and time.time() < end:
    time.sleep(0.05)
devices = logic.knownDevices()
torch_here = "torch" in sys.modules
logic.shutdown()
print(devices, torch_here)
"""


def test_devices_are_listed_by_the_worker_without_importing_torch_in_slicers_process(tiny_checkpoint, tmp_path):
    """Opening the panel or the effect must not freeze Slicer for the seconds PyTorch takes
    to import: the devices come from the worker process. A fresh interpreter, since this
    one has imported PyTorch already."""
    import subprocess

    script = tmp_path / "devices.py"
    script.write_text(DEVICES_WITHOUT_TORCH)
    out = subprocess.run([sys.executable, str(script), str(ROOT / "FewShotSeg"), str(ROOT), str(tiny_checkpoint)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    devices, torch_here = out.stdout.strip().rsplit(" ", 1)
    import torch

    expected = ["cpu"] + ["cuda"] * torch.cuda.is_available()
    assert devices.startswith(str(expected)[:-1]) and torch_here == "False"


def test_a_device_the_worker_lacks_is_one_line(chaos, tiny_checkpoint):
    """A scene saved on a computer with a GPU, opened on a laptop: the device is refused
    in one line (by the worker, which listed its devices), the segmentation unchanged."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this computer has CUDA")
    logic = FewShotSegLogic()
    before = snapshot(chaos.seg, chaos.image)
    try:
        with pytest.raises(FewShotSegError, match=r"^device 'cuda' is not available (to PyTorch )?here "
                                                  r"\(available: cpu"):
            logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, device="cuda", worker=True)
        assert logic.knownDevices() == ["cpu"]      # listed by the worker meanwhile
        with pytest.raises(FewShotSegError, match=r"^device 'cuda' is not available here \(available: cpu\)$"):
            logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, device="cuda", worker=True)
    finally:
        logic.shutdown()
    assertSameSegments(before, snapshot(chaos.seg, chaos.image))


def test_worker_that_cannot_start_or_import(chaos, tiny_checkpoint, tmp_path):
    """A missing interpreter, or one without the engine's packages: one clear message each,
    nothing written."""
    before = snapshot(chaos.seg, chaos.image)
    missing = FewShotSegLogic(workerPython=str(tmp_path / "no-such-python"))
    with pytest.raises(FewShotSegError, match="could not start the FewShotSeg worker"):
        missing.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, worker=True)
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 3\n")
    broken.chmod(0o755)
    logic = FewShotSegLogic(workerPython=str(broken))
    with pytest.raises(WorkerStopped, match=r"exit code 3\); the segmentation was not changed\. "
                                            r"Last words: ModuleNotFoundError: No module named torch") as stopped:
        logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, worker=True)
    # the crash's log is kept for the user, and the message names it
    log = Path(str(stopped.value).split("Its log: ")[-1])
    assert log.is_file() and "No module named torch" in log.read_text()
    shutil.rmtree(log.parent)
    assertSameSegments(before, snapshot(chaos.seg, chaos.image))
    assert not logic.isBusy and not missing.isBusy


def test_propagate_clicked_twice(logic, chaos, tiny_checkpoint):
    before = snapshot(chaos.seg, chaos.image)
    job = logic.prepare(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, forWorker=True)
    handle = logic.startPropagation(job)
    try:
        with pytest.raises(FewShotSegError, match="already running"):
            logic.prepare(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, forWorker=True)
        with pytest.raises(FewShotSegError, match="already running"):
            logic.startPropagation(job)
        assertSameSegments(before, snapshot(chaos.seg, chaos.image))
    finally:
        handle.cancel()
        mainLoop(handle, timeout=60)
    assertSameSegments(before, snapshot(chaos.seg, chaos.image))


def test_scene_reloaded_between_two_runs(logic, scene, chaos, tiny_checkpoint, tmp_path):
    """Run, save, clear the scene, load volume + segmentation again, correct, run: the
    worker gets the new volume, the user's slices come back from the file."""
    logic.propagate(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct", worker=True)
    segPath = tmp_path / "liver.seg.nrrd"
    storage = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(segPath))
    assert storage.WriteData(chaos.seg)
    liverId, written = chaos.liver, geometry.segmentToArray(chaos.seg, chaos.liver, chaos.image)
    scene.scene.Clear(0)
    image = scene.load(chaos.path)
    seg = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(segPath))
    assert reader.ReadData(seg)
    assert np.array_equal(geometry.segmentToArray(seg, liverId, image), written)
    erased = int(np.flatnonzero(written.any((1, 2)))[-1])
    edited = written.copy()
    edited[erased] = False
    geometry.writeSegment(seg, liverId, edited, image)
    summary = logic.propagate(image, seg, liverId, model=tiny_checkpoint, mode="direct", worker=True)
    result = geometry.segmentToArray(seg, liverId, image)
    assert summary.paintedSlices == 1 and summary.endSlices == 1
    assert np.array_equal(result[chaos.k], chaos.painted[chaos.k]) and not result[erased].any()


def test_scene_closed_while_the_worker_runs(logic, scene, chaos, tiny_checkpoint):
    job = logic.prepare(chaos.image, chaos.seg, chaos.liver, model=tiny_checkpoint, mode="direct", forWorker=True)
    handle = logic.startPropagation(job)
    scene.scene.Clear(0)
    mainLoop(handle, timeout=120)
    with pytest.raises(FewShotSegError, match="removed while propagating; nothing was written"):
        logic.apply(job, handle.outcome())


# -- the record itself ------------------------------------------------------------------------------
def test_record_round_trip_and_refusals():
    record = userslices.SliceRecord(0, (4, 3, 2), "ab12", [2, 0], [1, 2**32 - 1, 0, 7])
    text = record.encode()
    assert "|" not in text and ":" not in text  # Slicer writes tags as key:value|key:value
    back = userslices.SliceRecord.decode(text)
    assert (back.axis, back.shape, back.grid, back.user, back.written) == (0, (4, 3, 2), "ab12", [0, 2],
                                                                           [1, 2**32 - 1, 0, 7])
    for bad in ("", "v0;a0", text.replace("a0", "a7"), text[:-8], text.replace("u0,2", "u9")):
        assert userslices.SliceRecord.decode(bad) is None


def test_classify_finds_painted_and_erased_slices():
    mask = np.zeros((6, 5, 5), bool)
    mask[1:5, 1:4, 1:4] = True
    record = userslices.SliceRecord(0, mask.shape, "g", [2], userslices.sliceChecksums(mask, 0))
    edited = mask.copy()
    edited[4] = False            # erased
    edited[1, 0, 0] = True       # painted a little
    users = userslices.classify(edited, record, 0, "g")
    assert users.user == [1, 2, 4] and users.edited == [1, 4] and not users.fresh
    support, exclude = userslices.supportAndExclude(edited, 0, users.user)
    assert np.array_equal(support[[1, 2]], edited[[1, 2]]) and not support[[0, 3, 4, 5]].any()
    assert exclude[4].all() and not exclude[[0, 1, 2, 3, 5]].any()
    assert userslices.classify(edited, record, 0, "another grid").fresh
    assert userslices.classify(edited, record, 1, "g").fresh
