"""Intensity normalisation and slice extraction: ONE code path for training and inference.

Steps, in this order, for a volume and an anatomical axis:

1. Intensities (`IntensityNormalizer`, `normalize_intensities`): CT is clipped to the
   window ``ct_window`` (HU), MR above its ``mr_clip_percentile`` percentile; then a
   z-score with the mean and standard deviation of the whole clipped volume.
2. Slices along the axis are resized to ``size x size`` by `SliceSampler`, which keeps
   the physical aspect ratio: the square field of view is the longer physical side of
   the slice, the slice is resized so that one model pixel covers ``fov / size`` mm in
   both directions, and it is centred with padding (images: the normalised volume
   minimum; masks: 0). `SliceSampler.from_model` crops and resizes back (bilinear,
   ``align_corners=False`` everywhere).

`prepare_volume` only measures the intensity statistics (one chunked pass over the
volume, float32, no full copy); model-grid slices are made on demand by
`PreparedVolume.model_slices(indices)`. `PreparedVolume.slices` builds (once, then keeps)
all of them: ``N * size * size * 4`` bytes, e.g. 79 MB for 300 slices at 256.

Slices are taken in array order (no re-orientation): the support and query slices of
one volume always share their orientation.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FewShotSegError

if TYPE_CHECKING:  # the annotation only; training from slice packs runs without SimpleITK
    import SimpleITK as sitk

MODALITIES = ("auto", "ct", "mr")
_CHUNK_VOXELS = 1 << 22        # voxels per chunk when scanning a volume (16 MB as float32)
_PERCENTILE_SAMPLE = 1 << 23   # percentiles of larger volumes use a regular subsample
_DETECT_SAMPLE = 1 << 20
_STATS_CHUNK = 1 << 18          # voxels per step of the statistics pass (1 MB, stays in cache)
_STATS_EXACT_UP_TO = 1 << 24    # larger volumes: mean and SD from every k-th slice (>= 2^23 voxels)
_ANTIALIAS_ABOVE = 2.0 + 1e-6  # shrink factor beyond which bilinear resizing is anti-aliased


# ----------------------------------------------------------------------------- config
@dataclass
class PreprocessConfig:
    """Pre-processing settings; stored in every checkpoint (`to_dict` / `from_dict`)."""

    modality: str = "auto"                              # 'auto' | 'ct' | 'mr'
    ct_window: tuple = (-125.0, 275.0)                  # HU clip range for CT
    mr_clip_percentile: float = 99.5                    # MR: clip above this percentile
    size: int = 256                                     # model grid (size x size)

    def __post_init__(self) -> None:
        modality = str(self.modality).lower()
        if modality not in MODALITIES:
            raise FewShotSegError(f"unknown modality '{self.modality}'; choose auto, ct or mr")
        self.modality = modality
        try:
            low, high = (float(v) for v in self.ct_window)
        except (TypeError, ValueError):
            raise FewShotSegError(f"ct_window must be two numbers (low, high), not {self.ct_window!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise FewShotSegError(f"ct_window must be finite with low < high, not {self.ct_window!r}")
        self.ct_window = (low, high)
        try:
            self.mr_clip_percentile = float(self.mr_clip_percentile)
        except (TypeError, ValueError):
            raise FewShotSegError(f"mr_clip_percentile must be a number, not {self.mr_clip_percentile!r}") from None
        if not 50.0 < self.mr_clip_percentile <= 100.0:
            raise FewShotSegError(f"mr_clip_percentile must lie in (50, 100], not {self.mr_clip_percentile}")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) \
                and not (isinstance(self.size, float) and self.size.is_integer()):
            raise FewShotSegError(f"size must be a whole number of pixels, not {self.size!r}")
        self.size = int(self.size)
        if not 16 <= self.size <= 2048:
            raise FewShotSegError(f"size must lie in 16..2048 pixels, not {self.size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ct_window"] = list(self.ct_window)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        if not isinstance(data, dict):
            raise FewShotSegError(f"pre-processing settings must be a mapping, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FewShotSegError(f"unknown pre-processing setting(s): {', '.join(map(str, unknown))}; "
                                  f"known: {', '.join(sorted(known))}")
        return cls(**data)


def _as_config(cfg) -> PreprocessConfig:
    if cfg is None:
        return PreprocessConfig()
    if isinstance(cfg, PreprocessConfig):
        return cfg
    if isinstance(cfg, dict):
        return PreprocessConfig.from_dict(cfg)
    raise FewShotSegError(f"pre-processing settings must be a PreprocessConfig, not {type(cfg).__name__}")


# ----------------------------------------------------------------------------- intensities
def _subsample(array: np.ndarray, count: int) -> np.ndarray:
    """A regular subsample of about ``count`` voxels (odd strides, to avoid aliasing with
    the image grid); a view when possible, never a copy of the whole volume."""
    array = np.asarray(array)
    if array.size <= count:
        return array.reshape(-1)
    if array.flags.c_contiguous:
        return array.reshape(-1)[:: (array.size // count) | 1]
    step = max(1, int(round((array.size / count) ** (1.0 / array.ndim)))) | 1
    return array[(slice(None, None, step),) * array.ndim].reshape(-1)


_LARGEST_VALUE = 1e15    # |intensity| beyond this is a broken scaling (float32 squares would overflow)


def _slabs(array: np.ndarray, voxels: int):
    """Views of consecutive slabs along the first axis, about ``voxels`` voxels each."""
    array = np.asarray(array)
    if array.ndim == 0:
        array = array.reshape(1)
    per_slab = max(1, voxels // max(1, array[0].size))
    for start in range(0, array.shape[0], per_slab):
        yield array[start:start + per_slab]


def detect_modality(array: np.ndarray) -> str:
    """'ct' when the intensities look like Hounsfield units, else 'mr'.

    CT: the minimum is at most -500, at least 1% of the voxels lie below -200 HU (air,
    lung, bowel gas, the padding outside the scan field), and most of what is not air
    lies in the soft-tissue window (`CT_SOFT_TISSUE_HU`: fat, muscle, organs, blood; over
    90% in the abdominal and DICOM CTs here). An MR stored with an offset or as z-scores
    (background at -500 or -1000) passes the first two and fails the third (under 30%):
    taken as a CT, the window left it almost constant and the result was silently wrong.
    Force the modality in `PreprocessConfig` when this guess is wrong.
    """
    sample = _subsample(array, _DETECT_SAMPLE)
    if sample.size == 0:
        raise FewShotSegError("the image is empty")
    low = min(float(sample.min()), float(np.asarray(array).min()))
    if low > -500 or float(np.count_nonzero(sample < -200)) < 0.01 * sample.size:
        return "mr"
    body = sample[sample > -500]
    if body.size < 0.01 * sample.size:
        return "mr"               # nothing above air: the CT window would leave one value
    lo, hi = CT_SOFT_TISSUE_HU
    soft = float(np.count_nonzero((body >= lo) & (body <= hi))) / body.size
    return "ct" if soft >= CT_SOFT_TISSUE_SHARE else "mr"


# what is not air in a CT: mostly fat, muscle, organs and blood, in Hounsfield units
CT_SOFT_TISSUE_HU = (-150.0, 300.0)
CT_SOFT_TISSUE_SHARE = 0.4


@dataclass(frozen=True)
class IntensityNormalizer:
    """clip(x, low, high) then (x - mean) / std; fitted once per volume (`fit`)."""

    modality: str
    low: float      # -inf when there is no lower clip
    high: float
    mean: float
    std: float
    minimum: float      # the smallest normalised value of the volume (the padding value)
    clipped_min: float  # the same before the z-score (original units)

    @classmethod
    def fit(cls, array: np.ndarray, cfg: PreprocessConfig | None = None,
            modality: Optional[str] = None) -> "IntensityNormalizer":
        cfg = _as_config(cfg)
        array = np.asarray(array)
        if array.size == 0:
            raise FewShotSegError("the image is empty")
        modality = (modality or cfg.modality).lower()
        if modality == "auto":
            modality = detect_modality(array)
        if modality == "ct":
            low, high = cfg.ct_window
        elif modality == "mr":
            low = -math.inf
            high = float(np.percentile(_subsample(array, _PERCENTILE_SAMPLE), cfg.mr_clip_percentile))
        else:
            raise FewShotSegError(f"unknown modality '{modality}'; choose auto, ct or mr")
        shift = float(np.clip(np.mean(_subsample(array, 1 << 16), dtype=np.float64), low, high))
        lo32, hi32, shift32 = np.float32(low), np.float32(high), np.float32(shift)
        total = total_sq = 0.0
        # clipping is monotonic: the clipped minimum is the clipped minimum voxel (NaN stays NaN)
        clipped_min = float(np.clip(np.float64(array.min()), low, high))
        if math.isfinite(clipped_min) and math.isfinite(high) and max(abs(clipped_min), abs(high)) > _LARGEST_VALUE:
            raise FewShotSegError(f"the image holds values up to {max(abs(clipped_min), abs(high)):.3g}, beyond any "
                                  "scan's range: check its scaling (rescale slope) or its pixel type")
        # a CT of 512x512x300 is 78 M voxels: every k-th slice gives its mean and SD to
        # ~0.01 SD (the normalised values move by less than that) in a tenth of the time
        sample = array[::-(-array.size // (_STATS_EXACT_UP_TO >> 1))] \
            if array.ndim and array.size > _STATS_EXACT_UP_TO else array
        # one reused cache-sized buffer: ~4x faster than fresh 16 MB temporaries
        plane = max(1, sample[0].size) if sample.ndim else 1
        buf = np.empty(max(plane, min(sample.size, _STATS_CHUNK // plane * plane)), np.float32)
        for slab in _slabs(sample, _STATS_CHUNK):
            chunk = buf[:slab.size].reshape(slab.shape)
            chunk[...] = slab
            np.clip(chunk, lo32, hi32, out=chunk)
            chunk -= shift32
            total += float(chunk.sum(dtype=np.float64))
            np.square(chunk, out=chunk)
            total_sq += float(chunk.sum(dtype=np.float64))
        n = sample.size
        centred = total / n
        mean = shift + centred
        var = max(total_sq / n - centred * centred, 0.0)
        std = math.sqrt(var)
        if not (math.isfinite(mean) and math.isfinite(std) and math.isfinite(high) and math.isfinite(clipped_min)):
            raise FewShotSegError("the image contains non-finite voxels (NaN or inf)")
        if not std > 1e-6 * max(1.0, abs(mean)):
            std = 1.0  # a constant volume: centre it, do not blow it up
        minimum = (clipped_min - mean) / std
        return cls(modality=modality, low=float(low), high=float(high), mean=float(mean),
                   std=float(std), minimum=float(minimum), clipped_min=float(clipped_min))

    def clip_(self, t: torch.Tensor) -> torch.Tensor:
        """The clipping step alone, in place."""
        return t.clamp_(min=None if math.isinf(self.low) else self.low, max=self.high)

    def scale_(self, t: torch.Tensor) -> torch.Tensor:
        """The z-score step alone, in place (commutes with bilinear resizing and padding
        with `clipped_min`, so slices are clipped at full size and scaled on the model grid)."""
        return t.sub_(self.mean).div_(self.std)

    def apply_(self, t: torch.Tensor) -> torch.Tensor:
        """Normalise a float32 tensor in place (and return it)."""
        return self.scale_(self.clip_(t))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        out = np.array(array, dtype=np.float32, copy=True)
        self.apply_(torch.from_numpy(out))
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_intensities(array: np.ndarray, cfg: PreprocessConfig | None = None,
                          modality: Optional[str] = None) -> np.ndarray:
    """Window (CT) / top-percentile clip (MR), then z-score per volume; a new float32 array."""
    return IntensityNormalizer.fit(array, cfg, modality)(array)


# ----------------------------------------------------------------------------- resizing
class SliceSampler:
    """Physical-aspect-preserving resize of 2D slices to ``size x size`` and back.

    ``shape_rc``: (rows, cols) of the slices; ``spacing_rc``: their physical spacing (mm).
    The square field of view is ``max(rows * sr, cols * sc)`` mm, so one model pixel is
    ``model_spacing = fov / size`` mm in both directions; the resized slice
    (``resized``: rows, cols) is centred at ``offset`` (top, left).
    """

    def __init__(self, shape_rc: Sequence[int], spacing_rc: Sequence[float], size: int):
        rows, cols = (int(v) for v in shape_rc)
        sr, sc = (float(v) for v in spacing_rc)
        if rows < 1 or cols < 1:
            raise FewShotSegError(f"slice shape {tuple(shape_rc)} is empty")
        if not (sr > 0 and sc > 0 and math.isfinite(sr) and math.isfinite(sc)):
            raise FewShotSegError(f"slice spacing {tuple(spacing_rc)} must be positive")
        self.shape_rc = (rows, cols)
        self.spacing_rc = (sr, sc)
        self.size = int(size)
        self.fov = max(rows * sr, cols * sc)
        self.model_spacing = self.fov / self.size
        h = min(self.size, max(1, int(round(rows * sr / self.model_spacing))))
        w = min(self.size, max(1, int(round(cols * sc / self.model_spacing))))
        self.resized = (h, w)
        self.offset = ((self.size - h) // 2, (self.size - w) // 2)

    def __repr__(self) -> str:
        return (f"SliceSampler(shape_rc={self.shape_rc}, spacing_rc={self.spacing_rc}, size={self.size}; "
                f"resized={self.resized}, offset={self.offset}, model_spacing={self.model_spacing:.4g} mm)")

    @staticmethod
    def _resize(t: torch.Tensor, shape: tuple, mode: str) -> torch.Tensor:
        """[N,H,W] float32 -> [N,h,w].

        Bilinear, ``align_corners=False``; anti-aliased when it shrinks a side more than
        twice (up to 2x every input pixel still contributes, and the anti-aliasing filter
        costs 4x the time on a 2-core CPU).
        """
        if tuple(t.shape[-2:]) == tuple(shape):
            return t
        x = t.unsqueeze(1)
        if mode == "nearest":
            x = F.interpolate(x, size=shape, mode="nearest-exact")
        else:
            shrink = t.shape[-2] > _ANTIALIAS_ABOVE * shape[0] or t.shape[-1] > _ANTIALIAS_ABOVE * shape[1]
            x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=shrink)
        return x.squeeze(1)

    @staticmethod
    def _as_batch(slices, expected: tuple, what: str):
        t = torch.as_tensor(slices)
        single = t.dim() == 2
        if single:
            t = t.unsqueeze(0)
        if t.dim() != 3 or tuple(t.shape[-2:]) != tuple(expected):
            raise FewShotSegError(f"{what} must have shape [N, {expected[0]}, {expected[1]}], "
                                  f"not {list(t.shape)}")
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        return t, single

    def to_model(self, slices: torch.Tensor, mode: str = "bilinear", pad_value: float = 0.0) -> torch.Tensor:
        """[N,H,W] (or [H,W]) -> [N,size,size] float32; padding gets ``pad_value``."""
        if mode not in ("bilinear", "nearest"):
            raise FewShotSegError(f"unknown resize mode '{mode}'; use bilinear or nearest")
        t, single = self._as_batch(slices, self.shape_rc, "slices")
        resized = self._resize(t, self.resized, mode)
        h, w = self.resized
        top, left = self.offset
        if (h, w) == (self.size, self.size):
            out = resized.clone() if resized is t else resized.contiguous()  # never alias the input
        else:
            out = torch.full((t.shape[0], self.size, self.size), float(pad_value), dtype=torch.float32,
                             device=t.device)
            out[:, top:top + h, left:left + w] = resized
        return out[0] if single else out

    def from_model(self, probs: torch.Tensor) -> torch.Tensor:
        """[N,size,size] (or [size,size]) -> [N,H,W] float32: crop the padding, bilinear resize."""
        t, single = self._as_batch(probs, (self.size, self.size), "model-grid slices")
        h, w = self.resized
        top, left = self.offset
        crop = t[:, top:top + h, left:left + w]
        out = self._resize(crop, self.shape_rc, "bilinear")
        out = out.clone(memory_format=torch.contiguous_format) if out is crop else out.contiguous()
        return out[0] if single else out


# ----------------------------------------------------------------------------- volumes
def _in_plane_axes(axis_index: int) -> tuple:
    return tuple(a for a in range(3) if a != axis_index)


class PreparedVolume:
    """A volume ready for the model along one axis; slices are made on demand.

    ``shape``: the volume array shape (k, j, i); ``axis_index``: the numpy axis slices are
    taken along; ``sampler``: the `SliceSampler` of those slices; ``normalizer``: the
    fitted `IntensityNormalizer`; ``modality``: 'ct' or 'mr'; ``size``: the model grid.
    """

    def __init__(self, array: np.ndarray, spacing: Sequence[float], axis_index: int,
                 cfg: PreprocessConfig | None = None, *, keep_alive=None):
        cfg = _as_config(cfg)
        array = np.asarray(array)
        if array.ndim != 3:
            raise FewShotSegError(f"a 3D volume is needed, not {array.ndim}D")
        if axis_index not in (0, 1, 2):
            raise FewShotSegError(f"axis index must be 0, 1 or 2, not {axis_index}")
        self._array = array
        self._keep_alive = keep_alive  # the SimpleITK image that owns the array buffer
        self.config = cfg
        self.shape = tuple(int(v) for v in array.shape)
        self.spacing = tuple(float(v) for v in spacing)  # array order (k, j, i)
        self.axis_index = int(axis_index)
        self.size = cfg.size
        self.num_slices = self.shape[self.axis_index]
        rows, cols = _in_plane_axes(self.axis_index)
        self.sampler = SliceSampler((self.shape[rows], self.shape[cols]),
                                    (self.spacing[rows], self.spacing[cols]), cfg.size)
        self.normalizer = IntensityNormalizer.fit(array, cfg)
        self.modality = self.normalizer.modality
        self.pad_value = self.normalizer.minimum
        self._slices: Optional[torch.Tensor] = None
        plane = self.shape[rows] * self.shape[cols]
        self._chunk = max(1, _CHUNK_VOXELS // max(1, plane))

    def __len__(self) -> int:
        return self.num_slices

    # -- helpers ---------------------------------------------------------------------
    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.num_slices or idx.max() >= self.num_slices):
            raise FewShotSegError(f"slice index out of range 0..{self.num_slices - 1}")
        return np.where(idx < 0, idx + self.num_slices, idx)

    def _take(self, volume: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Slices ``idx`` of ``volume`` along the axis as a [n,H,W] array (a fresh copy)."""
        if self.axis_index == 0:
            return volume[idx]
        return np.moveaxis(np.take(volume, idx, axis=self.axis_index), self.axis_index, 0)

    def _take_float(self, volume: np.ndarray, idx: np.ndarray, binary: bool = False) -> torch.Tensor:
        """Slices ``idx`` as a new C-contiguous float32 tensor [n,H,W].

        Runs of consecutive slices are copied (with the type conversion and the axis move
        in the same pass) from a torch view of the volume; ``binary``: non-zero -> 1.
        """
        view = _torch_view(volume)
        if view is None:  # dtypes / strides torch cannot view: numpy fancy indexing
            raw = self._take(volume, idx)
            if binary and raw.dtype.kind != "f":
                raw = raw != 0
            return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        rows, cols = _in_plane_axes(self.axis_index)
        out = torch.empty((idx.size, self.shape[rows], self.shape[cols]), dtype=torch.float32)
        for p0, p1, first in _runs(idx):
            n = p1 - p0
            if self.axis_index == 2:
                # slices across the innermost axis: read a natural-order slab, then one 2D
                # transpose (3x faster than a strided 3D copy)
                slab = torch.from_numpy(np.ascontiguousarray(volume[:, :, first:first + n]))
                part = slab.reshape(-1, n).t().contiguous().reshape(n, self.shape[0], self.shape[1])
            else:
                part = view.narrow(self.axis_index, first, n).movedim(self.axis_index, 0)
            if binary and not part.is_floating_point():
                part = part != 0
            out[p0:p1].copy_(part)
        return out

    def raw_slices(self, indices) -> np.ndarray:
        """The original (not normalised, not resized) slices, [len, H, W], native dtype."""
        return np.ascontiguousarray(self._take(self._array, self._indices(indices)))

    # -- images ----------------------------------------------------------------------
    def model_slices(self, indices) -> torch.Tensor:
        """Normalised model-grid slices ``indices``: Tensor[len(indices), size, size] float32."""
        idx = self._indices(indices)
        if self._slices is not None:
            return self._slices[torch.from_numpy(idx)]
        out = torch.empty((idx.size, self.size, self.size), dtype=torch.float32)
        for start in range(0, idx.size, self._chunk):
            part = idx[start:start + self._chunk]
            t = self._take_float(self._array, part)
            self.normalizer.clip_(t)
            out[start:start + part.size] = self.sampler.to_model(t, "bilinear", self.normalizer.clipped_min)
        return self.normalizer.scale_(out)  # = normalise, then resize and pad with the minimum

    @property
    def slices(self) -> torch.Tensor:
        """All N slices on the model grid (built on first use, then kept: N*size*size*4 bytes)."""
        if self._slices is None:
            self._slices = self.model_slices(np.arange(self.num_slices))
        return self._slices

    def slice_subset(self, indices) -> torch.Tensor:
        """Alias of `model_slices`: only the slices asked for are prepared."""
        return self.model_slices(indices)

    # -- masks and probabilities -------------------------------------------------------
    def mask_to_model(self, mask3d: np.ndarray, indices=None) -> torch.Tensor:
        """A 3D mask (volume array order) -> Tensor[N,size,size] float32 in [0, 1].

        Bilinear (soft edges); empty slices are not resized. With ``indices`` only those
        slices are returned (Tensor[len, size, size]).
        """
        mask = np.asarray(mask3d)
        if mask.shape != self.shape:
            raise FewShotSegError(f"mask shape {mask.shape} differs from the image {self.shape}")
        idx = np.arange(self.num_slices) if indices is None else self._indices(indices)
        out = torch.zeros((idx.size, self.size, self.size), dtype=torch.float32)
        nonzero = np.any(mask, axis=_in_plane_axes(self.axis_index))
        rows = np.flatnonzero(nonzero[idx])
        for start in range(0, rows.size, self._chunk):
            part = rows[start:start + self._chunk]
            # label values count as foreground; float masks stay soft
            t = self._take_float(mask, idx[part], binary=True)
            out[torch.from_numpy(part)] = self.sampler.to_model(t, "bilinear", 0.0)
        return out

    def probs_to_volume(self, probs: torch.Tensor, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Tensor[N,size,size] on the model grid -> float32 volume in array order (k, j, i).

        All-zero slices are not resized (they stay 0).
        """
        t = torch.as_tensor(probs)
        expected = (self.num_slices, self.size, self.size)
        if tuple(t.shape) != expected:
            raise FewShotSegError(f"probabilities must have shape {list(expected)}, not {list(t.shape)}")
        t = t.detach().to("cpu", torch.float32)
        nonzero = np.flatnonzero(t.reshape(t.shape[0], -1).ne(0).any(1).numpy())
        return self.slices_to_volume(nonzero, t[torch.from_numpy(nonzero)], out)

    def slices_to_volume(self, indices, probs: torch.Tensor, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Model-grid slices ``indices`` (ascending) -> float32 volume; every other slice is 0.

        A propagation touches a few dozen of a CT's slices: this never builds or scans the
        whole model-grid stack."""
        part_all = np.asarray(indices, dtype=np.int64)
        t = torch.as_tensor(probs).detach().to("cpu", torch.float32)
        if t.shape[0] != part_all.size or (part_all.size and np.any(np.diff(part_all) <= 0)):
            raise FewShotSegError("slices_to_volume needs one probability slice per ascending index")
        if out is None:
            out = np.zeros(self.shape, np.float32)      # calloc: untouched slices cost nothing
        elif out.shape != self.shape or out.dtype != np.float32:
            raise FewShotSegError(f"output array must be float32 of shape {self.shape}")
        else:
            out[...] = 0
        target = torch.from_numpy(out)
        for start in range(0, part_all.size, self._chunk):
            part = part_all[start:start + self._chunk]
            back = self.sampler.from_model(t[start:start + part.size])
            for p0, p1, first in _runs(part):
                n = p1 - p0
                if self.axis_index == 2:  # one 2D transpose, then rows of n contiguous values
                    block = back[p0:p1].reshape(n, -1).t().contiguous().reshape(self.shape[0], self.shape[1], n)
                    out[:, :, first:first + n] = block.numpy()
                else:
                    target.narrow(self.axis_index, first, n).copy_(back[p0:p1].movedim(0, self.axis_index))
        return out


def _runs(idx: np.ndarray):
    """(start, end, first value) of each run of consecutive increasing values in ``idx``."""
    if idx.size == 0:
        return
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    for a, b in zip(starts.tolist(), ends.tolist()):
        yield a, b, int(idx[a])


_TORCH_VIEWABLE = {np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16,
                                          np.int32, np.int64, np.bool_)}


def _torch_view(array: np.ndarray) -> Optional[torch.Tensor]:
    """A read-only-by-convention torch view of ``array`` (never written through), or None."""
    if array.dtype not in _TORCH_VIEWABLE or any(st < 0 for st in array.strides) \
            or any(st % array.itemsize for st in array.strides):
        return None
    with warnings.catch_warnings():  # SimpleITK array views are not writable; we only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def prepare_array(array: np.ndarray, spacing: Sequence[float], axis_index: int,
                  cfg: PreprocessConfig | None = None) -> PreparedVolume:
    """`prepare_volume` for a bare array: ``spacing`` in array order (k, j, i)."""
    return PreparedVolume(array, spacing, axis_index, cfg)


def prepare_volume(image: sitk.Image, axis: Union[str, int], cfg: PreprocessConfig | None = None) -> PreparedVolume:
    """Measure the intensity statistics of ``image`` and set up its slices along ``axis``.

    ``axis``: 'axial' | 'coronal' | 'sagittal' (see `imageio.array_axis_for`) or a numpy
    axis index. Cheap: model-grid slices are made by `PreparedVolume.model_slices`.
    """
    import SimpleITK as sitk

    from .imageio import array_axis_for

    if not isinstance(image, sitk.Image):
        raise FewShotSegError(f"prepare_volume needs a SimpleITK image, not {type(image).__name__}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise FewShotSegError("prepare_volume needs a 3D scalar image")
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        axis_index = int(axis)
    else:
        axis_index = array_axis_for(image, axis)
    array = sitk.GetArrayViewFromImage(image)
    spacing = tuple(reversed(image.GetSpacing()))
    return PreparedVolume(array, spacing, axis_index, cfg, keep_alive=image)


def body_mask(slice2d: np.ndarray) -> np.ndarray:
    """The patient, not the air around (air is dark in CT and MRI alike): above 10 % of the
    way from the 5th to the 99th intensity percentile, opened, the largest component, holes
    filled. Training keeps its superpixels inside it; the location prior boxes it."""
    from scipy import ndimage
    lo, hi = np.percentile(slice2d, [5, 99])
    fg = ndimage.binary_opening(slice2d > lo + 0.1 * (hi - lo), iterations=2)
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    largest = np.argmax(ndimage.sum(fg, labels, range(1, n + 1))) + 1
    return ndimage.binary_fill_holes(labels == largest)
