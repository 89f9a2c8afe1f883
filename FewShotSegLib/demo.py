"""`fewshotseg demo`: the README's first command, on a real CHAOS-T2 scan.

Paints each organ on its largest slice (taken from the manual label, as a user would
paint it), propagates with the shipped model, prints Dice against the label and the
time, and writes the masks and a PNG overview.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checkpoints import load_checkpoint
from .errors import FewShotSegError
from .evaluation import CHAOS_ORGANS, load_chaos_case, painting_axis, score_structure, shared_data_dir
from .imageio import label_image_like, write_image
from .model_store import resolve_model_path
from .overview import overlay, save_overview
from .propagation import PropagationOptions


def run_demo(data_dir=None, case: str = "1", organ: str = "all", model=None,
             mode: str = "chained", out_dir: Path = Path("out/demo")) -> list:
    data = shared_data_dir(data_dir)
    organs = list(CHAOS_ORGANS) if organ == "all" else [organ]
    unknown = [o for o in organs if o not in CHAOS_ORGANS]
    if unknown:
        raise FewShotSegError(f"unknown organ '{unknown[0]}'; choose {', '.join(CHAOS_ORGANS)} or all")
    image, label = load_chaos_case(data, case)
    checkpoint = None if mode == "registration" else load_checkpoint(resolve_model_path(model))
    options = PropagationOptions(mode=mode)
    axis_index = painting_axis(image, options)
    image_array = sitk.GetArrayViewFromImage(image)
    combined = np.zeros(label.shape, np.uint8)
    rows, scores = [], []
    name = checkpoint.path.name if checkpoint else "registration"
    print(f"CHAOS-T2 case {case}, model {name}, mode {mode}")
    for organ_name in organs:
        value = CHAOS_ORGANS[organ_name]
        score, result, support = score_structure(image, label, value, checkpoint, options,
                                                 case=case, organ=organ_name)
        scores.append(score)
        combined[result.mask.astype(bool)] = value
        print(f"  {organ_name:13s} Dice {score.dice:.3f}  HD95 {score.hd95:6.1f} mm  "
              f"{score.seconds:.2f} s ({score.slices_done} slices)")
        rows.append((organ_name, _tiles(image_array, label == value, result.mask.astype(bool),
                                        support, score.support_slice, axis_index)))
    mean = float(np.mean([s.dice for s in scores]))
    total = sum(s.seconds for s in scores)
    print(f"  mean Dice {mean:.3f}, total propagation time {total:.2f} s")
    out_dir = Path(out_dir)
    mask_path = write_image(label_image_like(combined, image), out_dir / f"chaos_{case}_prediction.nii.gz")
    png = save_overview(out_dir / f"chaos_{case}_overview.png", rows)
    print(f"  wrote {mask_path} and {png}")
    return scores


def _tiles(image, truth, pred, support, index, axis_index):
    """The support slice and two slices halfway to each end of the organ."""
    extent = np.flatnonzero(np.moveaxis(truth, axis_index, 0).reshape(truth.shape[axis_index], -1).any(1))
    picks = [(int(extent[0]) + index) // 2, index, (index + int(extent[-1])) // 2]
    tiles = []
    for i in picks:
        take = lambda a: np.take(a, i, axis=axis_index)
        caption = "support" if i == index else f"slice {i}"
        masks = {"label": take(truth), "prediction": take(pred)}
        if i == index:
            masks = {"support": take(support)}
        tiles.append((caption, overlay(take(image), masks)))
    return tiles
