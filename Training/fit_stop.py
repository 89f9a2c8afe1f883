"""Fit the stop model (FewShotSegLib/stopping.py) on walks over labelled training structures.

For each structure the step network walks outward with no stop rule from the slices a
user paints (the largest slice alone; the largest with a slice near either end) and every
step is recorded with its numbers and whether its mask is mostly wrong (under half of it
on the structure): the walk has run past the end or onto a neighbour. A logistic
regression of "mostly wrong" on the numbers is the stop model.

Data: CHAOS-T2 labels of the cases given (default: five of the ten the shipped step
network trained on) and TotalSegmentator CT classes that no benchmark scores. Nothing of
the held-out CHAOS cases, the scored CT structures or any MR label.

    python -m Training.fit_stop --out Resources/Models/fewshotseg-propagator.stop.json
"""
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
WRONG_FRACTION = 0.5
# steps kept after a walk has gone wrong: the decision that matters is the first one
KEEP_WRONG = 3


def _structures(data_dir: Path, chaos: list[str], ct_per_scan: int):
    import SimpleITK as sitk
    from FewShotSegLib.evaluation import load_chaos_case
    from FewShotSegLib.imageio import read_image

    for case in chaos:
        image, label = load_chaos_case(data_dir, case)
        for organ in CHAOS_ORGANS:
            yield f"chaos {case}/{organ}", image, label == organ
    folder = data_dir / "totalseg"
    for scan in CT_SCANS if ct_per_scan > 0 else ():
        path = folder / scan if (folder / scan).is_dir() else folder / f"{scan}.nii.gz"
        if not path.exists():
            continue
        image = read_image(path)
        label = sitk.GetArrayFromImage(read_image(folder / f"{scan}_seg.nii.gz", label=True))
        values, counts = np.unique(label, return_counts=True)
        chosen = [int(v) for v, c in sorted(zip(values, counts), key=lambda t: -t[1])
                  if v != 0 and int(v) not in SCORED_CT and c >= 2000
                  and int((label == v).any(axis=(1, 2)).sum()) >= 6][:ct_per_scan]
        for value in chosen:
            yield f"{scan}/{value}", image, label == value


def _supports(truth: np.ndarray) -> list[list[int]]:
    """The painted slices of each walk set: the largest slice, then with one near each end."""
    areas = truth.reshape(truth.shape[0], -1).sum(1)
    present = np.flatnonzero(areas)
    largest = int(np.argmax(areas))
    out = [[largest]]
    for q in (0.15, 0.85):
        near_end = int(present[int(round(q * (len(present) - 1)))])
        if near_end != largest:
            out.append(sorted({largest, near_end}))
    return out


def structure_examples(image, truth: np.ndarray, stepper) -> tuple[np.ndarray, np.ndarray]:
    """Features and 'mostly wrong' labels of every outward step, no stop rule."""
    from FewShotSegLib.propagation import PropagationOptions, PropagationSession, propagate
    from FewShotSegLib.stopping import FEATURES

    session = PropagationSession()
    options = PropagationOptions(mode="learned", stop="none", axis=0)
    feats, wrong = [], []
    for painted in _supports(truth):
        support = np.zeros_like(truth)
        support[painted] = truth[painted]
        propagate(image, support, stepper, options, session=session)
    prepared = session.prepared
    for w in session.walks.values():
        if not w.features:
            continue
        slices = sorted(w.features)
        if slices[0] < w.start:
            slices = slices[::-1]                  # the walk's own order: outward
        true = prepared.mask_to_model(truth, slices) >= 0.5
        seen_wrong = 0
        for i, t in zip(slices, true):
            if i not in w.probs or seen_wrong >= KEEP_WRONG:
                continue
            mask = w.probs[i] >= 0.5
            is_wrong = float((mask & t).sum()) < WRONG_FRACTION * float(mask.sum())
            seen_wrong += is_wrong
            feats.append(w.features[i])
            wrong.append(is_wrong)
    return np.array(feats).reshape(-1, len(FEATURES)), np.array(wrong, np.float64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=None, help="shared data folder (default ../shared/data)")
    parser.add_argument("--stepper", default=None, help="step network (default: the shipped one)")
    parser.add_argument("--chaos", default=",".join(CHAOS_FIT), help="CHAOS case ids whose labels are used")
    parser.add_argument("--ct-per-scan", type=int, default=12, help="unscored CT classes per scan (largest first)")
    parser.add_argument("--features", default=None, help="comma-separated subset of the features (default: all)")
    parser.add_argument("--examples", type=Path, default=None,
                        help="an .npz of walked examples: read if it exists, else written after walking")
    args = parser.parse_args(argv)
    import torch

    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.evaluation import shared_data_dir
    from FewShotSegLib.stopping import FEATURES
    torch.set_num_threads(1)
    data_dir = shared_data_dir(args.data)
    stepper = load_for_mode(args.stepper, "learned")
    start = time.perf_counter()
    use = [f.strip() for f in args.features.split(",")] if args.features else None
    if args.examples is not None and args.examples.is_file():
        cached = np.load(args.examples)
        if list(cached["features_names"]) != list(FEATURES):
            raise FewShotSegError(f"{args.examples}: examples of other features; walk again")
        return _fit_and_write(args, argv, cached["x"], cached["y"], int(cached["structures"]), use, start)
    xs, ys, names = [], [], []
    from FewShotSegLib.imageio import array_axis_for
    for name, image, truth in _structures(data_dir, [c for c in args.chaos.split(",") if c], args.ct_per_scan):
        if array_axis_for(image, "axial") != 0:
            raise FewShotSegError(f"{name}: its axial slices are not the first array axis")
        x, y = structure_examples(image, truth, stepper)
        xs.append(x)
        ys.append(y)
        names.append(name)
        print(f"{name}: {len(y)} steps, {int(y.sum())} mostly wrong", flush=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if args.examples is not None:
        np.savez(args.examples, x=x, y=y, structures=len(names), features_names=np.array(FEATURES))
    return _fit_and_write(args, argv, x, y, len(names), use, start)


def _fit_and_write(args, argv, x, y, structures: int, use, start: float) -> int:
    from FewShotSegLib.stopping import FEATURES, fit_stop_model
    info = {"fitted": datetime.date.today().isoformat(), "structures": structures, "steps": int(len(y)),
            "wrong_steps": int(y.sum()), "data": f"CHAOS-T2 cases {args.chaos} (4 organs); TotalSegmentator CT "
            f"unscored classes ({args.ct_per_scan} per scan: {', '.join(CT_SCANS)})",
            "stepper": args.stepper or "the shipped step network", "label": f"under {WRONG_FRACTION:.0%} of the step's mask on the structure",
            "command": shlex.join(["python", "-m", "Training.fit_stop"] + list(argv or sys.argv[1:])),
            "seconds": round(time.perf_counter() - start, 1)}
    info["features_used"] = use or list(FEATURES)
    model = fit_stop_model(x, y, info=info, use=use)
    p = np.array([model.probability(f) for f in x])
    info["train_accuracy_balanced"] = round(float(0.5 * ((p[y > 0.5] >= 0.5).mean() + (p[y < 0.5] < 0.5).mean())), 3)
    text = (json.dumps(model.to_dict(), indent=1) + "\n").encode()
    atomic_write(args.out, lambda f: f.write(text))
    print(json.dumps(dict(zip(FEATURES, np.round(model.weights, 3).tolist()))), "bias", round(model.bias, 3))
    print(f"{args.out}: {info['steps']} steps ({info['wrong_steps']} wrong), balanced accuracy "
          f"{info['train_accuracy_balanced']}, {info['seconds']} s")
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except FewShotSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
