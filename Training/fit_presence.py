"""Fit the step network's presence read-out (FewShotSegLib/stopping.py, options.presence).

As Training/fit_stop.py, but each step also records the step network's own pooled features
(models.slicestep.presence_features), and the structures are walked in all three planes
(each volume turned so that the plane's slices are its first array axis): a read-out fitted
on axial walks alone set its threshold where coronal walks do not end. Walks run with the
zero-motion offset on every walk when ``--zero-motion-max-mm`` is given, as they will run.

Data: the step network's own training labels only (``--chaos``, ``--ct-per-scan``), never a
benchmark's held-out or scored structures (Training/fitting.py).

    python -m Training.fit_presence --stepper NET.pt --out NET.presence.json --zero-motion-max-mm 100
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from Training import fitting  # noqa: E402
from Training.fit_stop import WRONG_FRACTION, walked_steps, write_step_classifier  # noqa: E402

# array axis that becomes the first one: sitk.PermuteAxes order, numpy transpose
PLANES = {"axial": ((0, 1, 2), (0, 1, 2)), "coronal": ((0, 2, 1), (1, 0, 2)), "sagittal": ((1, 2, 0), (2, 0, 1))}


def turned(image, truth: np.ndarray, plane: str):
    """``image`` and ``truth`` with ``plane``'s slices along the first array axis (the
    same physical voxels: SimpleITK keeps the geometry)."""
    import SimpleITK as sitk
    order, transpose = PLANES[plane]
    return (sitk.PermuteAxes(image, list(order)) if plane != "axial" else image), np.transpose(truth, transpose)


def structure_examples(image, truth: np.ndarray, stepper, zero_motion_max_mm: float, planes: list[str]):
    """Presence features and 'mostly wrong' labels of every outward step, no stop rule."""
    from FewShotSegLib.propagation import PropagationOptions
    feats, wrong = [], []
    for plane in planes:
        volume, truth_p = turned(image, truth, plane)
        if int(truth_p.any(axis=(1, 2)).sum()) < 3:
            continue
        options = PropagationOptions(mode="learned", stop="none", axis=0, registration_walk_weight=0.0,
                                     zero_motion_max_mm=zero_motion_max_mm)
        f, w = walked_steps(volume, truth_p, stepper, options, lambda walk: walk.presence)
        feats += f
        wrong += w
    width = len(feats[0]) if feats else 0
    return np.array(feats).reshape(-1, width), np.array(wrong, np.float64)


def main(argv=None) -> int:
    parser = fitting.parser(__doc__.splitlines()[0])
    parser.add_argument("--zero-motion-max-mm", type=float, default=0.0,
                        help="walk with the zero-motion offset across slices at most this far apart (default 0)")
    parser.add_argument("--planes", default="axial,coronal,sagittal")
    parser.add_argument("--l2", type=float, default=1e-2)
    parser.add_argument("--examples", type=Path, default=None,
                        help="an .npz of walked examples: read if it exists, else written after walking")
    args = parser.parse_args(argv)
    from FewShotSegLib.stopping import presence_features_of
    start = time.perf_counter()
    data_dir, stepper = fitting.setup(args)
    net = stepper.model if hasattr(stepper, "model") else stepper
    names = presence_features_of(net)
    planes = [p.strip() for p in args.planes.split(",") if p.strip()]
    if set(planes) - set(PLANES):
        raise FewShotSegError(f"--planes: choose from {', '.join(PLANES)}")
    if args.examples is not None and args.examples.is_file():
        cached = np.load(args.examples)
        x, y, count = cached["x"], cached["y"], int(cached["structures"])
    else:
        x, y, count = fitting.collect(
            args, data_dir, lambda image, truth: structure_examples(image, truth, stepper, args.zero_motion_max_mm, planes),
            "walk steps")
        if args.examples is not None:
            np.savez(args.examples, x=x, y=y, structures=count)
    if x.shape[1] != len(names):
        raise FewShotSegError(f"examples hold {x.shape[1]} features; this network's read-out has {len(names)}")
    from FewShotSegLib.fitted import fit_logistic
    info = fitting.info(args, argv, "Training.fit_presence", start, structures=count, steps=int(len(y)),
                        wrong_steps=int(y.sum()), planes=planes, zero_motion_max_mm=args.zero_motion_max_mm,
                        label=f"under {WRONG_FRACTION:.0%} of the step's mask on the structure")
    return write_step_classifier(args.out, fit_logistic(x, y, names, l2=args.l2, info=info), x, y)


def cli(argv=None) -> int:
    return fitting.cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
