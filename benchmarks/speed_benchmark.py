"""Speed and memory of `fewshotseg propagate` on this machine's CPU.

Cases: a 256x256x40 CHAOS-T2 MRI (liver painted on its largest slice) and a 512x512x300
CT made by resampling ../shared/data/totalseg/ct_abdomen_3mm.nii.gz onto a 512x512x300
grid over the same field of view (liver painted). Each case runs in a fresh process so
peak RSS is that of one propagation; the ratio of total time to the network's own
forward time shows the engine's overhead. Then, in the same process and session, one
correction: the label's slice halfway from the painted slice to the structure's far end
is painted too and the volume propagated again (the interactive loop's click).
``--plane coronal|sagittal``: the structure painted in its largest slice of that plane
instead (the CT's coronal slices lie 0.6 mm apart); ``--walk-step-mm``: the option of that
name (Slicer's "Faster across thin slices" is 3).
Writes benchmarks/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"mri_256x256x40": 2.0, "ct_512x512x300": 20.0}


def make_cases(data_dir: Path, work: Path, plane: str = "axial") -> dict:
    """Write the two benchmark volumes and their one-slice supports into ``work``."""
    import numpy as np
    import SimpleITK as sitk
    from FewShotSegLib.evaluation import largest_slice_support
    from FewShotSegLib.imageio import array_axis_for, read_image

    cases = {}
    mri = read_image(data_dir / "chaos_t2" / "image_1.nii.gz")
    mri_label = read_image(data_dir / "chaos_t2" / "label_1.nii.gz", label=True)
    size = list(mri.GetSize())
    size[2] = 40
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetOrigin(mri.GetOrigin()); ref.SetSpacing(mri.GetSpacing()); ref.SetDirection(mri.GetDirection())
    cases["mri_256x256x40"] = (sitk.Resample(mri, ref, sitk.Transform(), sitk.sitkLinear, 0.0),
                               sitk.Resample(mri_label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0), 1)
    ct = read_image(data_dir / "totalseg" / "ct_abdomen_3mm.nii.gz")
    ct_label = read_image(data_dir / "totalseg" / "ct_abdomen_3mm_seg.nii.gz", label=True)
    extent = np.array(ct.GetSize()) * np.array(ct.GetSpacing())
    new_size = [512, 512, 300]
    ref = sitk.Image(new_size, sitk.sitkFloat32)
    ref.SetOrigin(ct.GetOrigin()); ref.SetDirection(ct.GetDirection())
    ref.SetSpacing([float(e / n) for e, n in zip(extent, new_size)])
    cases["ct_512x512x300"] = (sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1024.0),
                               sitk.Resample(ct_label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0), 5)
    out = {}
    for name, (image, label, value) in cases.items():
        arr = sitk.GetArrayFromImage(label) == value
        axis = array_axis_for(image, plane)
        support, painted = largest_slice_support(arr, axis)
        rows = np.flatnonzero(np.moveaxis(arr, axis, 0).any((1, 2)))
        far = int(rows[0]) if painted - rows[0] > rows[-1] - painted else int(rows[-1])
        corrected = support.copy()
        middle = (painted + far) // 2
        np.moveaxis(corrected, axis, 0)[middle] = np.moveaxis(arr, axis, 0)[middle]
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(work / f"{name}.nii.gz"))
        for suffix, mask in (("support", support), ("corrected", corrected)):
            sup = sitk.GetImageFromArray(mask.astype(np.uint8))
            sup.CopyInformation(image)
            sitk.WriteImage(sup, str(work / f"{name}_{suffix}.nii.gz"))
        out[name] = {"size": list(image.GetSize()), "spacing": [round(s, 3) for s in image.GetSpacing()],
                     "plane": plane, "slices_across": int(arr.shape[axis])}
    return out


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Linux's ru_maxrss survives exec, so a child started by
    a parent holding a big volume would report the parent's peak; VmHWM belongs to this
    process's memory map only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(image, support, model, mode, result_path, registration_weight=None, multi_scale=False, walk_step_mm=0.0):
    """Runs inside a fresh process: one propagation, timed, with the network's share."""
    import SimpleITK as sitk
    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.imageio import read_image, read_mask_like
    from FewShotSegLib.propagation import PropagationOptions, PropagationSession, propagate

    t0 = time.perf_counter()
    img = read_image(image)
    sup = sitk.GetArrayFromImage(read_mask_like(support, img)) > 0
    ckpt = load_for_mode(model, mode)
    t1 = time.perf_counter()
    options = PropagationOptions(mode=mode, multi_scale=multi_scale, walk_step_mm=walk_step_mm)
    if registration_weight is not None:
        options.registration_weight = registration_weight
    session = PropagationSession()
    result = propagate(img, sup, ckpt, options, session=session)
    t2 = time.perf_counter()
    peak_first = _peak_rss_mb()
    corrected = sitk.GetArrayFromImage(read_mask_like(str(support).replace("_support", "_corrected"), img)) > 0
    t3 = time.perf_counter()
    again = propagate(img, corrected, ckpt, options, session=session)
    t4 = time.perf_counter()
    Path(result_path).write_text(json.dumps({
        "load_seconds": t1 - t0, "propagate_seconds": t2 - t1,
        "network_seconds": result.network_seconds, "slices_done": result.slices_done,
        "overhead_ratio": (t2 - t1) / max(result.network_seconds, 1e-9),
        "repropagate_seconds": t4 - t3, "repropagate_slices_done": again.slices_done,
        "peak_rss_mb": peak_first, "peak_rss_mb_after_correction": _peak_rss_mb()}))


def _logic_child(image, support, model, mode, result_path, walk_step_mm=0.0):
    """Runs inside a fresh process: Apply -> filled segment through the module's Logic on
    real MRML nodes (PyPI slicer-core), as the Slicer user waits for it."""
    sys.path.insert(0, str(ROOT / "FewShotSeg"))
    from FewShotSegSlicerLib.logic import FewShotSegLogic
    from FewShotSegSlicerLib.headless import SlicerCore

    core = SlicerCore()
    volume = core.load(image)
    seg = core.segmentation(volume)
    labels = core.load(support, labelmap=True)
    segment_id = core.importLabels(labels, seg)[1]
    logic = FewShotSegLogic()
    summary = logic.propagate(volume, seg, segment_id, model=model, mode=mode, walkStepMm=walk_step_mm)
    Path(result_path).write_text(json.dumps({
        "logic_seconds": summary.seconds, "logic_engine_seconds": summary.engineSeconds,
        "logic_peak_rss_mb": _peak_rss_mb()}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--mode", default="chained")
    parser.add_argument("--data", default=None)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--logic-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--no-logic", action="store_true", help="skip the Slicer Logic timing (needs slicer-core)")
    parser.add_argument("--registration-weight", type=float, default=None,
                        help="chained: override the fusion weight (0 = the network alone)")
    parser.add_argument("--multi-scale", action="store_true", help="propagate with the model at 1 and 1.5x its grid")
    parser.add_argument("--plane", default="axial", choices=["axial", "coronal", "sagittal"],
                        help="the plane the structure is painted in (default axial)")
    parser.add_argument("--walk-step-mm", type=float, default=0.0, help="the propagation option (default 0)")
    parser.add_argument("--tag", default=None, help="results file speed_<tag>.json (default speed.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the timed processes (default: torch's own, what users get)")
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child[:2], args.model, args.mode, args.child[3], args.registration_weight, args.multi_scale,
               args.walk_step_mm)
        return
    if args.logic_child:
        _logic_child(*args.logic_child[:2], args.model, args.mode, args.logic_child[3], args.walk_step_mm)
        return
    from FewShotSegLib.evaluation import shared_data_dir, write_json
    from FewShotSegLib.models.multiscale import MULTI_SCALES
    import torch
    data_dir = shared_data_dir(args.data)
    from Training.provenance import hardware
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    threads = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                                 capture_output=True, text=True, check=True).stdout)
    results = {"hardware": f"{hardware(torch.device('cpu'), 1, threads)}, torch {torch.__version__}", "mode": args.mode,
               "threads": threads,
               "registration_weight": args.registration_weight, "multi_scale": args.multi_scale,
               "plane": args.plane, "walk_step_mm": args.walk_step_mm,
               "multi_scales": list(MULTI_SCALES) if args.multi_scale else None, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        geometry = make_cases(data_dir, work, args.plane)
        for name in TARGETS:
            image, support = work / f"{name}.nii.gz", work / f"{name}_support.nii.gz"
            res_file = work / f"{name}.json"
            weight = [] if args.registration_weight is None else ["--registration-weight", str(args.registration_weight)]
            weight += ["--multi-scale"] * args.multi_scale
            weight += ["--walk-step-mm", str(args.walk_step_mm)] if args.walk_step_mm else []
            cmd = [sys.executable, __file__, "--mode", args.mode, "--child", str(image), str(support), "_",
                   str(res_file)] + (["--model", args.model] if args.model else []) + weight
            subprocess.run(cmd, check=True, env=env)
            child = json.loads(res_file.read_text())
            out = work / f"{name}_out.nii.gz"
            cli = [sys.executable, "-m", "FewShotSegLib.cli", "propagate", str(image), "--support", str(support),
                   "--mode", args.mode, "-q", "-o", str(out)] + (["--model", args.model] if args.model else []) + weight
            t0 = time.perf_counter()
            subprocess.run(cli, check=True, cwd=ROOT, env=env)
            cli_seconds = time.perf_counter() - t0
            logic = {}
            if not args.no_logic and args.registration_weight is None and not args.multi_scale:  # the defaults
                logic_file = work / f"{name}_logic.json"
                logic_mode = "auto" if args.mode == "learned" else args.mode   # the Logic's auto runs a step network learned
                cmd = [sys.executable, __file__, "--mode", logic_mode, "--logic-child", str(image), str(support), "_",
                       str(logic_file)] + (["--model", args.model] if args.model else []) \
                    + (["--walk-step-mm", str(args.walk_step_mm)] if args.walk_step_mm else [])
                subprocess.run(cmd, check=True, env=env)
                logic = json.loads(logic_file.read_text())
                logic["logic_to_cli_ratio"] = logic["logic_seconds"] / cli_seconds
            results["cases"][name] = {**geometry[name], **child, **logic, "cli_wall_seconds": cli_seconds,
                                      "target_seconds": TARGETS[name]}
            print(name, json.dumps(results["cases"][name]), flush=True)
    write_json(ROOT / "benchmarks" / "results" / f"speed{'_' + args.tag if args.tag else ''}.json", results)


if __name__ == "__main__":
    main()
