"""What Training/fit_stop.py and Training/fit_suggest.py share: the training structures
they walk (never a benchmark's held-out ones), their command line, and how a fitted model
is written (FewShotSegLib/fitted.py)."""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from FewShotSegLib.checkpoints import atomic_write  # noqa: E402
from FewShotSegLib.errors import FewShotSegError  # noqa: E402

CHAOS_FIT = ("1", "2", "3", "5", "8")
CHAOS_ORGANS = (1, 2, 3, 4)
CT_SCANS = ("ct_abdomen_3mm", "ct_small_3mm", "ct_dicom")
# the CT classes the benchmarks score (benchmarks/interactive_benchmark.py): never fitted on
SCORED_CT = {1, 2, 3, 5, 6, 19, 21, 29, 52, 63, 77, 80, 86, 88}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default=None, help="shared data folder (default ../shared/data)")
    p.add_argument("--stepper", default=None, help="step network (default: the shipped one)")
    p.add_argument("--chaos", default=",".join(CHAOS_FIT), help="CHAOS case ids whose labels are used")
    p.add_argument("--ct-per-scan", type=int, default=12, help="unscored CT classes per scan (largest first)")
    return p


def structures(data_dir: Path, chaos: list[str], ct_per_scan: int):
    """(name, image, bool label) of the CHAOS organs of ``chaos`` and the ``ct_per_scan``
    largest unscored classes of each CT example (>= 2000 voxels over >= 6 slices); their
    axial slices are the first array axis."""
    from FewShotSegLib.evaluation import label_array, load_chaos_case
    from FewShotSegLib.imageio import array_axis_for, read_image

    def checked(name, image, truth):
        if array_axis_for(image, "axial") != 0:
            raise FewShotSegError(f"{name}: its axial slices are not the first array axis")
        return name, image, truth

    for case in chaos:
        image, label = load_chaos_case(data_dir, case)
        for organ in CHAOS_ORGANS:
            yield checked(f"chaos {case}/{organ}", image, label == organ)
    folder = data_dir / "totalseg"
    for scan in CT_SCANS if ct_per_scan > 0 else ():
        path = folder / scan if (folder / scan).is_dir() else folder / f"{scan}.nii.gz"
        if not path.exists():
            continue
        image = read_image(path)
        label = label_array(folder / f"{scan}_seg.nii.gz", image)
        values, counts = np.unique(label, return_counts=True)
        chosen = [int(v) for v, c in sorted(zip(values, counts), key=lambda t: -t[1])
                  if v != 0 and int(v) not in SCORED_CT and c >= 2000
                  and int((label == v).any(axis=(1, 2)).sum()) >= 6][:ct_per_scan]
        for value in chosen:
            yield checked(f"{scan}/{value}", image, label == value)


def setup(args):
    """(data folder, step network) with one torch thread (the fits are CPU work)."""
    import torch
    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.evaluation import shared_data_dir
    torch.set_num_threads(1)
    return shared_data_dir(args.data), load_for_mode(args.stepper, "learned")


def collect(args, data_dir: Path, examples_of, unit: str):
    """``examples_of(image, truth)`` -> (features, targets) over every training structure;
    (list of feature arrays, list of target arrays, structure count)."""
    xs, ys, count = [], [], 0
    for name, image, truth in structures(data_dir, [c for c in args.chaos.split(",") if c], args.ct_per_scan):
        x, y = examples_of(image, truth)
        xs.append(np.asarray(x, np.float64).reshape(len(y), -1))
        ys.append(np.asarray(y, np.float64))
        count += 1
        print(f"{name}: {len(y)} {unit}", flush=True)
    if not count or not sum(len(y) for y in ys):
        raise FewShotSegError(f"no {unit}: no training structure was found in the data")
    return np.concatenate(xs), np.concatenate(ys), count


def info(args, argv, module: str, start: float, **extra) -> dict:
    return {"fitted": datetime.date.today().isoformat(),
            "data": f"CHAOS-T2 cases {args.chaos} (4 organs); TotalSegmentator CT unscored classes "
                    f"({args.ct_per_scan} per scan: {', '.join(CT_SCANS)})",
            "stepper": args.stepper or "the shipped step network",
            "command": shlex.join(["python", "-m", module] + list(argv if argv is not None else sys.argv[1:])),
            "seconds": round(time.perf_counter() - start, 1), **extra}


def write(path: Path, model, summary: str) -> int:
    """The fitted model as JSON, whole or not at all; its weights and ``summary`` printed."""
    text = (json.dumps(model.to_dict(), indent=1) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))
    print(json.dumps(dict(zip(model.features, np.round(model.weights, 3).tolist()))), "bias", round(model.bias, 3))
    print(f"{path}: {summary}, {model.info['seconds']} s")
    return 0


def cli(main, argv=None) -> int:
    """``main`` with the engine's rule: bad input is one line and exit status 2."""
    try:
        return main(argv)
    except FewShotSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
