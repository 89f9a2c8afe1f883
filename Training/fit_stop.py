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

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from Training import fitting  # noqa: E402

WRONG_FRACTION = 0.5
# steps kept after a walk has gone wrong: the decision that matters is the first one
KEEP_WRONG = 3


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
    from FewShotSegLib.propagation import PropagationOptions
    from FewShotSegLib.stopping import FEATURES
    feats, wrong = walked_steps(image, truth, stepper, PropagationOptions(mode="learned", stop="none", axis=0),
                                lambda w: w.features)
    return np.array(feats).reshape(-1, len(FEATURES)), np.array(wrong, np.float64)


def walked_steps(image, truth: np.ndarray, stepper, options, recorded) -> tuple[list, list]:
    """The numbers ``recorded(walk)[slice]`` and 'mostly wrong' labels of the outward steps of
    walks from each set of painted slices (``_supports``); axis 0 is the slices'."""
    from FewShotSegLib.propagation import PropagationSession, propagate
    session = PropagationSession()
    for painted in _supports(truth):
        support = np.zeros_like(truth)
        support[painted] = truth[painted]
        propagate(image, support, stepper, options, session=session)
    feats, wrong = [], []
    for w, i, is_wrong in labelled_steps(session, truth, recorded):
        feats.append(recorded(w)[i])
        wrong.append(is_wrong)
    return feats, wrong


def labelled_steps(session, truth: np.ndarray, recorded):
    """(walk, slice, mostly wrong) of each outward step of the session's walks whose
    ``recorded(walk)`` (a dict by slice) holds it, in the walk's order, up to the first
    ``KEEP_WRONG`` wrong steps of each walk."""
    prepared = session.prepared
    for w in session.walks.values():
        slices = sorted(i for i, value in recorded(w).items() if value is not None)
        if not slices:
            continue
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
            yield w, i, is_wrong


def main(argv=None) -> int:
    parser = fitting.parser(__doc__.splitlines()[0])
    parser.add_argument("--features", default=None, help="comma-separated subset of the features (default: all)")
    parser.add_argument("--examples", type=Path, default=None,
                        help="an .npz of walked examples: read if it exists, else written after walking")
    args = parser.parse_args(argv)
    from FewShotSegLib.stopping import FEATURES
    start = time.perf_counter()
    use = [f.strip() for f in args.features.split(",")] if args.features else None
    if args.examples is not None and args.examples.is_file():
        cached = np.load(args.examples)
        if list(cached["features_names"]) != list(FEATURES):
            raise FewShotSegError(f"{args.examples}: examples of other features; walk again")
        return _fit_and_write(args, argv, cached["x"], cached["y"], int(cached["structures"]), use, start)
    data_dir, stepper = fitting.setup(args)
    x, y, count = fitting.collect(args, data_dir, lambda image, truth: structure_examples(image, truth, stepper),
                                  "walk steps")
    if args.examples is not None:
        np.savez(args.examples, x=x, y=y, structures=count, features_names=np.array(FEATURES))
    return _fit_and_write(args, argv, x, y, count, use, start)


def _fit_and_write(args, argv, x, y, structures: int, use, start: float) -> int:
    from FewShotSegLib.stopping import FEATURES, fit_stop_model
    info = fitting.info(args, argv, "Training.fit_stop", start, structures=structures, steps=int(len(y)),
                        wrong_steps=int(y.sum()), label=f"under {WRONG_FRACTION:.0%} of the step's mask on the structure",
                        features_used=use or list(FEATURES))
    return write_step_classifier(args.out, fit_stop_model(x, y, info=info, use=use), x, y)


def write_step_classifier(out: Path, model, x: np.ndarray, y: np.ndarray) -> int:
    """``model`` (P(a step is mostly wrong)) written with its balanced accuracy on ``x``."""
    p = np.array([model.probability(f) for f in x])
    model.info["train_accuracy_balanced"] = round(float(0.5 * ((p[y > 0.5] >= 0.5).mean()
                                                               + (p[y < 0.5] < 0.5).mean())), 3)
    return fitting.write(out, model, f"{model.info['steps']} steps ({model.info['wrong_steps']} wrong), balanced "
                                     f"accuracy {model.info['train_accuracy_balanced']}")


def cli(argv=None) -> int:
    return fitting.cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
