"""LiteMedSAM (opt-in, `pip install fewshotseg[medsam]`) against the registration, one painted slice.

Each structure is painted on its largest axial slice (its true mask), as round 0 of
``interactive_benchmark.py`` does, with that script's loaders and painting; then carried
through the volume by

* ``medsam``: ``FewShotSegLib.medsam.medsam_propagate`` with its defaults (box of the
  previous slice's mask, slice by slice outward; a walk stops when the mask is under 5 % of
  the painted area or under half of it lies in the painted region's 5-95 % intensity band);
* ``medsam_area``: the same with the area rule alone (``min_intensity_agreement=0``);
* ``medsam_range``: the area rule alone, walks kept inside the structure's true slice range:
  the authors' setting, where a 3D box comes with the case (an oracle, not a product number);
* ``registration``: ``propagate`` with ``PropagationOptions(mode="registration")``, the
  engine's non-learned comparator (intensity gate and clean-up on, as shipped).

3D Dice over the whole volume, seconds per structure and, for LiteMedSAM, per segmented
slice. LiteMedSAM costs ~5-10 s per slice on a CPU core, so the default set is small: four
structures of the TotalSegmentator CT (labels made by TotalSegmentator: agreement, not
accuracy) and the right kidney of CHAOS-T2 cases 1 and 2. LiteMedSAM's training data very
likely include CHAOS: the CHAOS numbers are not held out (model card).

    OMP_NUM_THREADS=1 nohup python benchmarks/medsam_benchmark.py > /tmp/medsam_bench.log 2>&1 &

Results: ``benchmarks/results/medsam.json``, written after every structure; a rerun with
the same ``--out`` skips the structures (x method) already there.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from interactive_benchmark import (chaos_structures, git_commit, hardware, inputs_for,  # noqa: E402
                                   slice_counts, totalseg_structures)

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("medsam", "medsam_area", "medsam_range", "registration")
TOTALSEG_DEFAULT = ("spleen", "kidney_right", "liver", "vertebrae_L3")
CHAOS_CASES, CHAOS_ORGANS = ("1", "2"), ("right_kidney",)


def run(method: str, image, truth: np.ndarray, axis: int, litemedsam=None) -> dict:
    """Paint the largest slice, propagate, score; one compact record."""
    from FewShotSegLib.metrics import dice
    painted = int(np.argmax(slice_counts(truth, axis)))
    support, _ = inputs_for(truth, axis, [painted], [])
    start = time.perf_counter()
    if method.startswith("medsam"):
        from FewShotSegLib.medsam import medsam_propagate
        options = {} if method == "medsam" else {"min_intensity_agreement": 0.0}
        if method == "medsam_range":
            options["slices"] = np.flatnonzero(slice_counts(truth, axis))
        before = litemedsam.slices_segmented
        pred = medsam_propagate(image, support, axis, model=litemedsam, **options).astype(bool)
        slices = litemedsam.slices_segmented - before
    else:
        from FewShotSegLib.propagation import PropagationOptions, propagate
        pred = propagate(image, support, None, PropagationOptions(mode="registration", axis=axis)).mask.astype(bool)
        slices = None
    seconds = time.perf_counter() - start
    record = {"dice": round(dice(pred, truth), 4), "seconds": round(seconds, 2), "painted": painted,
              "extent": int((slice_counts(truth, axis) > 0).sum()), "filled": int((slice_counts(pred, axis) > 0).sum())}
    if slices is not None:
        record.update(slices_segmented=slices, seconds_per_slice=round(seconds / max(slices, 1), 2))
    return record


def summarise(records: list) -> dict:
    out = {}
    for dataset in sorted({r["dataset"] for r in records}):
        rows = {}
        for method in METHODS:
            rs = [r for r in records if r["dataset"] == dataset and r["method"] == method]
            if rs:
                rows[method] = {"mean_dice": round(float(np.mean([r["dice"] for r in rs])), 4),
                                "structures": len(rs),
                                "seconds_per_structure": round(float(np.mean([r["seconds"] for r in rs])), 2)}
                if method.startswith("medsam"):
                    total = sum(r["slices_segmented"] for r in rs)
                    rows[method]["seconds_per_slice"] = round(sum(r["seconds"] for r in rs) / max(total, 1), 2)
        out[dataset] = rows
    return out


def write(path: Path, records: list, settings: dict, threads: int) -> None:
    payload = {"benchmark": "medsam", "date": dt.datetime.now().isoformat(timespec="seconds"),
               "commit": git_commit(), "hardware": hardware(threads), "settings": settings,
               "summary": summarise(records), "structures": records}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--totalseg", default=",".join(TOTALSEG_DEFAULT), help="TotalSegmentator structures ('' = none)")
    parser.add_argument("--cases", default=",".join(CHAOS_CASES), help="CHAOS-T2 case ids ('' = none)")
    parser.add_argument("--organs", default=",".join(CHAOS_ORGANS), help="CHAOS organs")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data", default=None, help="shared data folder (default ../shared/data)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "medsam.json"))
    args = parser.parse_args(argv)
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    from FewShotSegLib.evaluation import shared_data_dir
    from FewShotSegLib.imageio import array_axis_for
    methods = [m for m in args.methods.split(",") if m]
    if set(methods) - set(METHODS):
        parser.error(f"methods: choose from {', '.join(METHODS)}")
    data_dir = shared_data_dir(args.data)
    out = Path(args.out)
    records = json.loads(out.read_text())["structures"] if out.is_file() else []
    have = {(r["dataset"], r["case"], r["organ"], r["method"]) for r in records}
    settings = {"painting": "largest axial slice (interactive_benchmark round 0)",
                "medsam": "medsam_propagate defaults (box +3 px on the 256 grid; outward walks stop under 5 % of "
                          "the painted area or under 0.5 intensity agreement)",
                "medsam_area": "min_intensity_agreement=0 (area rule alone)",
                "medsam_range": "min_intensity_agreement=0, slices = the structure's true slice range (oracle)",
                "registration": "PropagationOptions(mode='registration')"}
    litemedsam = None
    if any(m.startswith("medsam") for m in methods):
        from FewShotSegLib.medsam import LiteMedSAM
        litemedsam = LiteMedSAM()
    structures = []
    if args.totalseg:
        structures.append(totalseg_structures(data_dir, args.totalseg.split(",")))
    if args.cases:
        structures.append(chaos_structures(data_dir, args.cases.split(","), args.organs.split(",")))
    for source in structures:
        for dataset, case, organ, image, truth, _ in source:
            axis = array_axis_for(image, "axial")
            for method in methods:
                if (dataset, case, organ, method) in have:
                    continue
                record = {"dataset": dataset, "case": case, "organ": organ, "method": method}
                record.update(run(method, image, truth, axis, litemedsam))
                records.append(record)
                write(out, records, settings, args.threads)
                print(f"{dataset} {case} {organ:14s} {method:12s} Dice {record['dice']:.3f}  {record['seconds']:.1f} s"
                      + (f"  ({record['slices_segmented']} slices, {record['seconds_per_slice']:.2f} s/slice)"
                         if method.startswith("medsam") else ""), flush=True)
    print(json.dumps(summarise(records), indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
