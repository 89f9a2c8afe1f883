"""Fit the ranking of where to look next (FewShotSegLib/suggestions.py) on training structures.

A simulated user (the interactive benchmark's: the largest slice first, then the slice with
the most wrong voxels) corrects each structure for a few rounds with the step network;
after every run each candidate slice's numbers (``SUGGEST_FEATURES``) are recorded with
the slice's true count of wrong pixels (model-grid units). A ridge regression of
log(1 + wrong pixels) on the numbers is the ranking: the tool then shows the slices it
predicts most wrong.

Data: as Training/fit_stop.py (CHAOS-T2 cases 1, 2, 3, 5, 8 and unscored TotalSegmentator
CT classes); nothing held out by the benchmarks.

    python -m Training.fit_suggest --out Resources/Models/fewshotseg-propagator.suggest.json
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
from Training.fit_stop import CHAOS_FIT, CT_SCANS, _structures  # noqa: E402

ROUNDS = 5


def _worst_slice(pred: np.ndarray, truth: np.ndarray, done: set):
    wrong = (pred != truth).reshape(truth.shape[0], -1).sum(1)
    wrong[sorted(done)] = -1
    index = int(np.argmax(wrong))
    return index if wrong[index] > 0 else None


def structure_examples(image, truth: np.ndarray, stepper, rounds: int = ROUNDS):
    """(features, log(1 + wrong pixels)) of the candidate slices after each round."""
    from FewShotSegLib.propagation import PropagationOptions, PropagationSession, propagate

    session = PropagationSession()
    options = PropagationOptions(mode="learned", axis=0, suggest="parts")
    areas = truth.reshape(truth.shape[0], -1).sum(1)
    painted, absent = [int(np.argmax(areas))], []
    xs, ys = [], []
    for _ in range(rounds):
        support = np.zeros_like(truth)
        support[painted] = truth[painted]
        exclude = None
        if absent:
            exclude = np.zeros_like(truth)
            exclude[absent] = True
        result = propagate(image, support, stepper, options, exclude=exclude, session=session)
        pred = result.mask > 0
        to_model = (session.prepared.size / max(truth.shape[1:])) ** 2
        wrong = (pred != truth).reshape(truth.shape[0], -1).sum(1) * to_model
        for i, f in result.slice_features.items():
            xs.append(f)
            ys.append(np.log1p(wrong[i]))
        nxt = _worst_slice(pred, truth, set(painted) | set(absent))
        if nxt is None:
            break
        (painted if areas[nxt] > 0 else absent).append(nxt)
    return xs, ys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=None, help="shared data folder (default ../shared/data)")
    parser.add_argument("--stepper", default=None, help="step network (default: the shipped one)")
    parser.add_argument("--chaos", default=",".join(CHAOS_FIT), help="CHAOS case ids whose labels are used")
    parser.add_argument("--ct-per-scan", type=int, default=12, help="unscored CT classes per scan (largest first)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="simulated corrections per structure")
    args = parser.parse_args(argv)
    import torch

    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.evaluation import shared_data_dir
    from FewShotSegLib.fitted import fit_ridge
    from FewShotSegLib.imageio import array_axis_for
    from FewShotSegLib.suggestions import SUGGEST_FEATURES
    torch.set_num_threads(1)
    data_dir = shared_data_dir(args.data)
    stepper = load_for_mode(args.stepper, "learned")
    start = time.perf_counter()
    xs, ys, names = [], [], []
    for name, image, truth in _structures(data_dir, [c for c in args.chaos.split(",") if c], args.ct_per_scan):
        if array_axis_for(image, "axial") != 0:
            raise FewShotSegError(f"{name}: its axial slices are not the first array axis")
        x, y = structure_examples(image, truth, stepper, args.rounds)
        xs += x
        ys += y
        names.append(name)
        print(f"{name}: {len(y)} candidate slices", flush=True)
    if not ys:
        raise FewShotSegError("no candidate slices: no structure was found in the data")
    x, y = np.array(xs), np.array(ys)
    info = {"fitted": datetime.date.today().isoformat(), "structures": len(names), "slices": int(len(y)),
            "data": f"CHAOS-T2 cases {args.chaos} (4 organs); TotalSegmentator CT unscored classes "
                    f"({args.ct_per_scan} per scan: {', '.join(CT_SCANS)})",
            "user": f"largest slice, then the worst slice, {args.rounds} runs per structure",
            "target": "log(1 + wrong pixels of the slice, model grid)",
            "stepper": args.stepper or "the shipped step network",
            "command": shlex.join(["python", "-m", "Training.fit_suggest"] + list(argv or sys.argv[1:])),
            "seconds": round(time.perf_counter() - start, 1)}
    model = fit_ridge(x, y, SUGGEST_FEATURES, info=info)
    predicted = np.array([model.predict(f) for f in x])
    info["r2"] = round(float(1 - ((predicted - y) ** 2).mean() / y.var()), 3)
    text = (json.dumps(model.to_dict(), indent=1) + "\n").encode()
    atomic_write(args.out, lambda f: f.write(text))
    print(json.dumps(dict(zip(SUGGEST_FEATURES, np.round(model.weights, 3).tolist()))), "bias", round(model.bias, 3))
    print(f"{args.out}: {info['slices']} slices from {info['structures']} structures, R2 {info['r2']}, "
          f"{info['seconds']} s")
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except FewShotSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
