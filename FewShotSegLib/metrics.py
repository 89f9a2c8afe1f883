"""Overlap and distance metrics, computed in 3D as the papers do (TP/FP/FN summed per scan)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean volumes; 1.0 when both are empty (nothing to find, nothing found)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = pred.sum(dtype=np.int64) + truth.sum(dtype=np.int64)
    if denom == 0:
        return 1.0
    return float(2 * np.logical_and(pred, truth).sum(dtype=np.int64) / denom)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    union = np.logical_or(pred, truth).sum(dtype=np.int64)
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, truth).sum(dtype=np.int64) / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th percentile symmetric surface distance in mm (spacing in array order).

    Infinite when exactly one of the masks is empty, 0 when both are.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("inf")
    sp, st = _surface(pred), _surface(truth)
    dist_to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    distances = np.concatenate([dist_to_truth[sp], dist_to_pred[st]])
    return float(np.percentile(distances, 95))


def evaluate_labels(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0),
                    labels=None) -> dict[int, dict[str, float]]:
    """Dice, IoU and HD95 for each label present in either volume (or the given labels): a
    structure only predicted scores 0, and one in neither is not reported."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, label {truth.shape}")
    if labels is None:
        labels = [int(v) for v in np.union1d(np.unique(truth), np.unique(pred)) if v != 0]
    out = {}
    for value in labels:
        p, t = pred == value, truth == value
        out[int(value)] = {"dice": dice(p, t), "iou": iou(p, t), "hd95": hd95(p, t, spacing)}
    return out
