"""The product benchmark's protocol in one place (demo, benchmarks and tests share it).

A user paints the structure on the slice where it is largest and clicks once; we score
the whole volume (every slice, no oracle range) with 3D Dice against the label.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import FewShotSegError
from .imageio import array_axis_for, read_image, read_mask_like
from .metrics import dice, hd95
from .propagation import PropagationOptions, propagate

CHAOS_ORGANS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
# TotalSegmentator label values for the same organs (agreement with its model-made labels)
TOTALSEG_ORGANS = {"liver": 5, "right_kidney": 2, "left_kidney": 3, "spleen": 1}


def shared_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """``../shared/data`` beside the repository, or $FEWSHOTSEG_DATA, or the given folder."""
    if explicit:
        path = Path(explicit)
    elif os.environ.get("FEWSHOTSEG_DATA"):
        path = Path(os.environ["FEWSHOTSEG_DATA"])
    else:
        path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise FewShotSegError(f"data folder not found: {path} (set FEWSHOTSEG_DATA or pass --data)")
    return path


def chaos_cases(data_dir: Path) -> list[str]:
    folder = data_dir / "chaos_t2"
    ids = sorted((p.name[len("image_"):-len(".nii.gz")] for p in folder.glob("image_*.nii.gz")), key=int)
    pairs = [i for i in ids if (folder / f"label_{i}.nii.gz").is_file()]
    if not pairs:
        raise FewShotSegError(f"no image_N.nii.gz / label_N.nii.gz pairs in {folder}")
    return pairs


def largest_slice_support(structure: np.ndarray, axis_index: int) -> tuple[np.ndarray, int]:
    """The support a user would paint: the structure on its largest-area slice."""
    moved = np.moveaxis(structure, axis_index, 0)
    areas = moved.reshape(moved.shape[0], -1).sum(1)
    if areas.max() == 0:
        raise FewShotSegError("the label does not contain this structure")
    index = int(np.argmax(areas))
    support = np.zeros_like(structure, dtype=bool)
    np.moveaxis(support, axis_index, 0)[index] = moved[index]
    return support, index


@dataclass
class CaseScore:
    case: str
    organ: str
    dice: float
    hd95: float
    seconds: float
    network_seconds: float
    support_slice: int
    slices_done: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def painting_axis(image: sitk.Image, options: PropagationOptions) -> int:
    """The array axis a simulated user paints across: the options' axis, or the axial
    slices when the engine is left to find the axis from the painting."""
    axis = options.axis
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        return int(axis)
    return array_axis_for(image, "axial" if str(axis).lower() == "auto" else axis)


def score_structure(image: sitk.Image, label_array: np.ndarray, value: int, model,
                    options: PropagationOptions, case: str = "", organ: str = "", progress=None):
    """Propagate from the largest slice of label ``value`` and score the 3D result;
    ``progress(fraction, message)`` follows the propagation."""
    truth = label_array == value
    axis_index = painting_axis(image, options)
    support, index = largest_slice_support(truth, axis_index)
    result = propagate(image, support, model, options, progress=progress)
    pred = result.mask.astype(bool)
    score = CaseScore(case=case, organ=organ, dice=dice(pred, truth),
                      hd95=hd95(pred, truth, image.GetSpacing()[::-1]), seconds=result.seconds,
                      network_seconds=result.network_seconds, support_slice=index,
                      slices_done=result.slices_done)
    return score, result, support


def summarise(scores: list[CaseScore]) -> dict:
    """Mean Dice per organ over cases, then the mean over organs (the papers' order)."""
    order = list(CHAOS_ORGANS)
    organs = sorted({s.organ for s in scores}, key=lambda o: (order.index(o) if o in order else 99, o))
    per_organ = {o: float(np.mean([s.dice for s in scores if s.organ == o])) for o in organs}
    hd = {o: float(np.median([s.hd95 for s in scores if s.organ == o])) for o in organs}
    return {"dice_per_organ": per_organ, "mean_dice": float(np.mean(list(per_organ.values()))),
            "median_hd95_per_organ": hd, "cases": len({s.case for s in scores}),
            "seconds_per_structure": float(np.mean([s.seconds for s in scores]))}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def label_array(path, image: sitk.Image) -> np.ndarray:
    """A label file as an array in ``image``'s voxel order, mapped through physical space.

    Why: a label map may store its rows in another order than its scan (the TotalSegmentator
    DICOM example's labels have the y axis flipped); taking its array as it is scores and
    paints the mirror image of the structure."""
    return sitk.GetArrayFromImage(read_mask_like(Path(path), image))


def load_chaos_case(data_dir: Path, case: str):
    folder = data_dir / "chaos_t2"
    image = read_image(folder / f"image_{case}.nii.gz")
    return image, label_array(folder / f"label_{case}.nii.gz", image)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
