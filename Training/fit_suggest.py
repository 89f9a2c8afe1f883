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

import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Training import fitting  # noqa: E402

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
    parser = fitting.parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="simulated corrections per structure")
    args = parser.parse_args(argv)
    from FewShotSegLib.fitted import fit_ridge
    from FewShotSegLib.suggestions import SUGGEST_FEATURES
    start = time.perf_counter()
    data_dir, stepper = fitting.setup(args)
    x, y, count = fitting.collect(args, data_dir, lambda image, truth: structure_examples(
        image, truth, stepper, args.rounds), "candidate slices")
    info = fitting.info(args, argv, "Training.fit_suggest", start, structures=count, slices=int(len(y)),
                        user=f"largest slice, then the worst slice, {args.rounds} runs per structure",
                        target="log(1 + wrong pixels of the slice, model grid)")
    model = fit_ridge(x, y, SUGGEST_FEATURES, info=info)
    predicted = np.array([model.predict(f) for f in x])
    info["r2"] = round(float(1 - ((predicted - y) ** 2).mean() / y.var()), 3)
    return fitting.write(args.out, model, f"{info['slices']} slices from {info['structures']} structures, "
                                          f"R2 {info['r2']}")


cli = functools.partial(fitting.cli, main)   # bad input: one line, exit status 2

if __name__ == "__main__":
    sys.exit(cli())
