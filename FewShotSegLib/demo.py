"""`fewshotseg demo`: the README's first command, on a real CHAOS-T2 scan.

Paints each organ on its largest slice (taken from the manual label, as a user would
paint it), propagates with the shipped model, prints Dice against the label and the
time, and writes the masks and a PNG overview. A progress bar follows each organ's
propagation (a few seconds each on a laptop CPU), so the wait never looks stuck. Then the
same paintings in one run, as several structures (structures.py): its Dice is printed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checkpoints import load_for_mode
from .errors import FewShotSegError
from .evaluation import CHAOS_ORGANS, load_chaos_case, painting_axis, score_structure, shared_data_dir
from .imageio import label_image_like, write_image
from .metrics import dice
from .overview import overlay, radiological, save_overview, view_letters
from .progress import progress_bar
from .propagation import PropagationOptions, resolved_mode
from .structures import propagate_structures


def run_demo(data_dir=None, case: str = "21", organ: str = "all", model=None,
             mode: str = "auto", out_dir: Path = Path("out/demo")) -> list:
    data = shared_data_dir(data_dir)
    organs = list(CHAOS_ORGANS) if organ == "all" else [organ]
    unknown = [o for o in organs if o not in CHAOS_ORGANS]
    if unknown:
        raise FewShotSegError(f"unknown organ '{unknown[0]}'; choose {', '.join(CHAOS_ORGANS)} or all")
    print(f"loading CHAOS-T2 case {case} and the model ...", flush=True)
    image, label = load_chaos_case(data, case)
    checkpoint = load_for_mode(model, mode)
    mode = resolved_mode(checkpoint, mode)
    options = PropagationOptions(mode=mode)
    axis_index = painting_axis(image, options)
    image_array = sitk.GetArrayViewFromImage(image)
    combined = np.zeros(label.shape, np.uint8)
    painted = np.zeros(label.shape, np.uint8)
    rows, scores = [], []
    name = checkpoint.path.name if checkpoint else "registration"
    print(f"CHAOS-T2 case {case}, model {name}, mode {mode}", flush=True)
    for organ_name in organs:
        value = CHAOS_ORGANS[organ_name]
        update, close = progress_bar(True)
        try:
            score, result, support = score_structure(
                image, label, value, checkpoint, options, case=case, organ=organ_name,
                progress=lambda f, m, o=organ_name: update(f, f"{o}: {m}"))
        finally:
            close()
        scores.append(score)
        combined[result.mask.astype(bool)] = value
        painted[support.astype(bool)] = value
        print(f"  {organ_name:13s} Dice {score.dice:.3f}  HD95 {score.hd95:6.1f} mm  "
              f"{score.seconds:.2f} s ({score.slices_done} slices)")
        rows.append((f"{organ_name} (Dice {score.dice:.3f})",
                     _tiles(image, image_array, label == value, result.mask.astype(bool), support,
                            score.support_slice, axis_index)))
    mean = float(np.mean([s.dice for s in scores]))
    total = sum(s.seconds for s in scores)
    print(f"  mean Dice {mean:.3f}, total propagation time {total:.2f} s")
    if len(organs) > 1:   # the same paintings in one run: what a multi-label --support does
        together = propagate_structures(image, painted, checkpoint, options)
        each = [dice(together.labels == CHAOS_ORGANS[o], label == CHAOS_ORGANS[o]) for o in organs]
        print(f"  all at once (one click; where two organs meet, the voxels go to the one painted nearest): "
              f"mean Dice {np.mean(each):.3f} ({', '.join(f'{o} {d:.3f}' for o, d in zip(organs, each))}), "
              f"{together.seconds:.2f} s")
    out_dir = Path(out_dir)
    mask_path = write_image(label_image_like(combined, image), out_dir / f"chaos_{case}_prediction.nii.gz")
    png = save_overview(out_dir / f"chaos_{case}_overview.png", rows, letters=view_letters(image, axis_index),
                        title=f"CHAOS-T2 case {case}: each organ painted on one slice, propagated "
                              f"({name}, {mode}); mean Dice {mean:.3f}")
    print(f"  wrote {mask_path} and {png}")
    return scores


def _tiles(image, volume, truth, pred, support, index, axis_index):
    """The painted slice and two slices halfway to each end of the organ, in radiological
    view, each captioned with its slice number and that slice's Dice."""
    extent = np.flatnonzero(np.moveaxis(truth, axis_index, 0).reshape(truth.shape[axis_index], -1).any(1))
    picks = [(int(extent[0]) + index) // 2, index, (index + int(extent[-1])) // 2]
    tiles = []
    for i in picks:
        take = lambda a: radiological(np.take(a, i, axis=axis_index), image, axis_index)  # noqa: E731
        if i == index:
            tiles.append((f"slice {i}, painted", overlay(take(volume), {"support": take(support)})))
            continue
        caption = f"slice {i}, Dice {dice(take(pred), take(truth)):.2f}"
        tiles.append((caption, overlay(take(volume), {"label": take(truth), "prediction": take(pred)})))
    return tiles
