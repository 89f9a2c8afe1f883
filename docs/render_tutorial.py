"""Render the tutorial's pictures (docs/images/tutorial_*.png) by doing what it says.

On CHAOS-T2 case 1, the liver: paint its largest slice (taken from the manual label, as a
user would paint it), `fewshotseg propagate`, find the slice with the most wrong voxels,
correct it (paint it as the label has it), propagate again. Each step runs the real
command line; the figures show the slices in radiological view with each slice's Dice.

    python docs/render_tutorial.py [--data ../shared/data] [--case 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from FewShotSegLib.cli import main as fewshotseg  # noqa: E402
from FewShotSegLib.evaluation import CHAOS_ORGANS, largest_slice_support, load_chaos_case, shared_data_dir  # noqa: E402
from FewShotSegLib.imageio import label_image_like, write_image  # noqa: E402
from FewShotSegLib.metrics import dice  # noqa: E402
from FewShotSegLib.overview import overlay, radiological, save_overview, view_letters  # noqa: E402

ORGAN = "liver"


def _propagate(image_path: Path, painted: np.ndarray, image: sitk.Image, work: Path, name: str) -> np.ndarray:
    support = write_image(label_image_like(painted.astype(np.uint8) * CHAOS_ORGANS[ORGAN], image),
                          work / f"{name}_painted.nii.gz")
    out = work / f"{name}.nii.gz"
    code = fewshotseg(["propagate", str(image_path), "--support", str(support), "-q", "-o", str(out)])
    if code != 0:
        raise SystemExit(f"render_tutorial: propagate failed ({code})")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0


def _tile(image, volume, k, masks: dict, caption: str):
    cut = lambda a: radiological(a[k], image, 0)  # noqa: E731
    return caption, overlay(cut(volume), {name: cut(m) for name, m in masks.items()})


def render(data_dir: Path, case: str, out_dir: Path) -> list[Path]:
    image, label = load_chaos_case(data_dir, case)
    image_path = data_dir / "chaos_t2" / f"image_{case}.nii.gz"
    truth = label == CHAOS_ORGANS[ORGAN]
    volume = sitk.GetArrayViewFromImage(image)
    painted, k0 = largest_slice_support(truth, 0)
    with tempfile.TemporaryDirectory() as tmp:
        first = _propagate(image_path, painted, image, Path(tmp), "round1")
        wrong = (first ^ truth).sum(axis=(1, 2))
        k1 = int(np.argmax(wrong))                      # the slice a user would correct first
        corrected = painted.copy()
        corrected[k1] = truth[k1]
        second = _propagate(image_path, corrected, image, Path(tmp), "round2")
    letters = view_letters(image, 0)
    other = k1 + (2 if k1 < k0 else -2)                 # a slice between the two painted ones
    slice_dice = lambda pred, k: dice(pred[k], truth[k])  # noqa: E731
    one = [("1. painted", [_tile(image, volume, k0, {"support": painted}, f"slice {k0}, painted")]),
           (f"2. propagated (Dice {dice(first, truth):.3f})",
            [_tile(image, volume, k, {"label": truth, "prediction": first}, f"slice {k}, Dice {slice_dice(first, k):.2f}")
             for k in (k1, other)])]
    two = [("3. corrected", [_tile(image, volume, k1, {"support": corrected}, f"slice {k1}, painted")]),
           (f"4. propagated again (Dice {dice(second, truth):.3f})",
            [_tile(image, volume, k, {"label": truth, "prediction": second}, f"slice {k}, Dice {slice_dice(second, k):.2f}")
             for k in (k1, other)])]
    print(f"painted {k0}, corrected {k1}; Dice {dice(first, truth):.3f} -> {dice(second, truth):.3f}; "
          f"slice {k1} {slice_dice(first, k1):.2f} -> 1.00, slice {other} {slice_dice(first, other):.2f} -> "
          f"{slice_dice(second, other):.2f}")
    title = f"CHAOS-T2 case {case}, {ORGAN}"
    paths = []
    for n, rows in ((1, one), (2, two)):
        tiles = [t for _, ts in rows for t in ts]
        heading = " | ".join(t for t, _ in rows)
        paths.append(save_overview(out_dir / f"tutorial_{n}.png", [(heading, tiles)], tile=224,
                                   letters=letters, title=title))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--case", default="1")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args(argv)
    for path in render(shared_data_dir(args.data), args.case, Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
