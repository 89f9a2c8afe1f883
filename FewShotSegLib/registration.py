"""Non-learned propagation: slice-to-slice deformable registration (SimpleITK demons).

Every table needs a comparator that learned nothing. It works on the same pre-processed
slices as the models (one code path), carries the mask from slice to slice with a
diffeomorphic demons field, and stops where the intensities under the carried mask no
longer look like those under the painted mask.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .extent import intensity_agreement, intensity_band

DEMONS_ITERATIONS = 40
DEMONS_SMOOTHING = 1.5
REGISTRATION_SHRINK = 2


def _as_image(array: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))


def _half(array: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return torch.nn.functional.avg_pool2d(t, REGISTRATION_SHRINK)[0, 0].numpy()


def carry_mask(fixed: np.ndarray, moving: np.ndarray, moving_mask: np.ndarray) -> np.ndarray:
    """Warp ``moving_mask`` (on ``moving``) onto ``fixed``; returns a soft mask in [0, 1].

    The field is estimated on a grid shrunk by ``REGISTRATION_SHRINK`` (4x fewer pixels:
    demons cost) and the soft mask is brought back with bilinear interpolation.
    """
    shape = fixed.shape
    fixed, moving, moving_mask = _half(fixed), _half(moving), _half(moving_mask)
    fixed_img, moving_img = _as_image(fixed), _as_image(moving)
    demons = sitk.DemonsRegistrationFilter()
    demons.SetNumberOfThreads(1)  # 2-D fields this small run faster on one thread
    demons.SetNumberOfIterations(DEMONS_ITERATIONS)
    demons.SetStandardDeviations(DEMONS_SMOOTHING)
    field = demons.Execute(fixed_img, moving_img)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    warped = sitk.Resample(_as_image(moving_mask), fixed_img, transform, sitk.sitkLinear, 0.0)
    soft = torch.from_numpy(sitk.GetArrayFromImage(warped))[None, None]
    return torch.nn.functional.interpolate(soft, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def propagate_by_registration(propagator, plan):
    """Run the walk plan of a `Propagator` with registration instead of a network."""
    opts = propagator.options
    prepared = propagate_prepare(propagator)
    painted_masks = prepared.mask_to_model(propagator.support).numpy()
    n, size = propagator.n, painted_masks.shape[-1]
    probs = np.zeros((n, size, size), np.float32)
    total = sum(len(w) for _, w in plan) or 1
    done, stops = 0, {}
    for p, walk in plan:
        image_p = prepared.model_slices([p])[0].numpy()
        mask_p = painted_masks[p]
        band = intensity_band(image_p, mask_p > 0.5)
        min_area = propagator._min_area(float(mask_p.sum()))
        prev_image, prev_mask = image_p, mask_p
        for k, i in enumerate(walk):
            propagator._check_cancel()
            image_i = prepared.model_slices([i])[0].numpy()
            soft = carry_mask(image_i, prev_image, prev_mask)
            done += 1
            mask = soft >= opts.threshold
            agreement = intensity_agreement(image_i, mask, band)
            if mask.sum() < min_area or agreement < opts.min_intensity_agreement:
                stops[f"{p}->{walk[-1]}"] = i
                break
            probs[i] = soft
            prev_image, prev_mask = image_i, mask.astype(np.float32)
            propagator.progress(0.05 + 0.9 * done / total, f"{done} slices registered")
    return prepared.probs_to_volume(torch.from_numpy(probs)), done, stops


def propagate_prepare(propagator):
    """The registration works on the intensity pipeline of the default pre-processing."""
    from .preprocessing import PreprocessConfig, prepare_volume
    config = getattr(propagator.model, "preprocess", None) or PreprocessConfig()
    return prepare_volume(propagator.image, propagator.options.axis, config)
