"""A location prior for cross-scan episodes: where the support's organ lies in its body,
carried to each query slice by the two bodies' bounding boxes.

A prototype network matches appearance only, so in an episode whose support and query are
different patients it also finds the organ's look-alikes: the other kidney, the liver's
edge beside the spleen. Patients differ, but an organ's place relative to the body's
outline varies far less than the distance to its look-alike. The prior is 1 near the
support mask mapped into the query body's box and falls off as a Gaussian beyond a margin;
the foreground probability is multiplied by it (protocol row ``+loc``). Only the support
slice's label and the query's image are used.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from FewShotSegLib.preprocessing import body_mask

# Prior: 1 within MARGIN of the mapped support mask, then exp(-x^2 / 2 SIGMA^2); both as
# fractions of the query body's size (the root of its box area). Set before scoring, not
# tuned on the protocol's folds.
PRIOR_MARGIN = 0.10
PRIOR_SIGMA = 0.10


def body_boxes(images: torch.Tensor) -> torch.Tensor:
    """``[N,4]`` (first row, last row, first column, last column) of each slice's body;
    the whole slice where nothing stands out."""
    boxes = []
    for image in images.detach().cpu().float().numpy():
        body = body_mask(image)   # the training's own: its superpixels lie inside it
        if not body.any():
            boxes.append([0, image.shape[0] - 1, 0, image.shape[1] - 1])
            continue
        rows, cols = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
        boxes.append([rows[0], rows[-1], cols[0], cols[-1]])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def mapped_mask(support_mask: torch.Tensor, support_box: torch.Tensor, query_boxes: torch.Tensor) -> torch.Tensor:
    """``[Q,H,W]`` bool: the support mask moved and stretched so that the support body's box
    lands on each query body's box."""
    h, w = support_mask.shape[-2:]
    out = []
    for box in query_boxes.reshape(-1, 4):
        # the support pixel (row, col) seen at each query pixel, as grid_sample coordinates
        rows = torch.arange(h, dtype=torch.float32)
        cols = torch.arange(w, dtype=torch.float32)
        s_rows = support_box[0] + (rows - box[0]) * (support_box[1] - support_box[0] + 1) / (box[1] - box[0] + 1)
        s_cols = support_box[2] + (cols - box[2]) * (support_box[3] - support_box[2] + 1) / (box[3] - box[2] + 1)
        gy, gx = torch.meshgrid((2 * s_rows + 1) / h - 1, (2 * s_cols + 1) / w - 1, indexing="ij")
        grid = torch.stack([gx, gy], -1)[None]
        warped = F.grid_sample(support_mask.float()[None, None], grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)
        out.append(warped[0, 0] >= 0.5)
    return torch.stack(out)


def location_prior(support_mask: torch.Tensor, support_box: torch.Tensor, query_boxes: torch.Tensor,
                   margin: float = PRIOR_MARGIN, sigma: float = PRIOR_SIGMA) -> torch.Tensor:
    """``[Q,H,W]`` in (0,1]: 1 within ``margin`` of the mapped support mask, a Gaussian of
    ``sigma`` beyond (both fractions of the query body's size). All ones where the
    support mask is empty or maps to nothing: no evidence, no prior."""
    priors = []
    for box, mask in zip(query_boxes.reshape(-1, 4), mapped_mask(support_mask, support_box, query_boxes)):
        mask, (top, bottom, left, right) = mask.numpy(), box.tolist()
        if not mask.any():
            priors.append(np.ones(mask.shape, dtype=np.float32))
            continue
        size = float(np.sqrt((bottom - top + 1) * (right - left + 1)))
        beyond = np.maximum(ndimage.distance_transform_edt(~mask) - margin * size, 0.0)
        priors.append(np.exp(-0.5 * (beyond / max(sigma * size, 1e-6)) ** 2).astype(np.float32))
    return torch.from_numpy(np.stack(priors))
