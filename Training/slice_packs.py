"""Slice packs: one volume's pre-processed training slices and pseudo-labels in one file.

Why: a leased GPU machine gets our working tree and nothing else: 64 MiB in all, no
SimpleITK, no ImageNet-weights package, no ``../shared/data``. A pack holds what
`Training.episodes.VolumeSlices` computes from an image -- the slices of
`FewShotSegLib.preprocessing.prepare_volume` (the inference path) and their Felzenszwalb
superpixels -- so training there reads neither the scan nor SimpleITK. For few-shot
setting 2 it also lists, per slice, the label values present, so the strict exclusion is
decided where the training runs, for any group of test classes.

Slices are kept as 8-bit codes over the volume's [lo, hi] range: the one lossy step,
max error (hi - lo) / 510 (about 0.01 z-score units on CHAOS-T2, below the augmentation's
own noise); superpixels are kept exactly. Format: an ``.npz`` (no pickles), xz-compressed
(about 1 MB per CHAOS-T2 volume).
"""
from __future__ import annotations

import io
import json
import lzma
from pathlib import Path

import numpy as np
import torch

from FewShotSegLib.checkpoints import atomic_write
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.model_store import sha256_of
from FewShotSegLib.preprocessing import PreprocessConfig

from .episodes import CACHE_VERSION, SUPERPIXEL_PARAMS, VolumeSlices

FORMAT = 1
SUFFIX = ".pack.xz"


def _label_values_per_slice(label_path: Path, image_path: Path, axis: str, n_slices: int) -> np.ndarray:
    """[n_slices, max label + 1] bool: which label values each slice along ``axis`` holds."""
    import SimpleITK as sitk
    from FewShotSegLib.imageio import array_axis_for, read_image, read_mask_like
    image = read_image(image_path)
    label = sitk.GetArrayFromImage(read_mask_like(Path(label_path), image))
    axis_index = array_axis_for(image, axis)
    other = tuple(a for a in range(3) if a != axis_index)
    table = np.zeros((n_slices, int(label.max()) + 1), bool)
    for value in np.unique(label):
        table[:, int(value)] = np.any(label == value, axis=other)
    return table


def write_pack(image_path, out_path, preprocess: PreprocessConfig, axis: str = "axial",
               cache_dir=None, label_path=None) -> Path:
    """Pack one image (its label, if given, only for the per-slice class table)."""
    image_path, out_path = Path(image_path), Path(out_path)
    volume = VolumeSlices(image_path, preprocess, axis, cache_dir)
    slices = volume.slices.numpy()
    lo, hi = float(slices.min()), float(slices.max())
    codes = np.round((slices - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
    classes = (_label_values_per_slice(label_path, image_path, axis, len(slices)) if label_path is not None
               else np.zeros((len(slices), 0), bool))
    meta = {"format": FORMAT, "source": image_path.name, "source_sha256": sha256_of(image_path),
            "preprocess": preprocess.to_dict(), "axis": axis, "superpixels": SUPERPIXEL_PARAMS,
            "superpixel_cache_version": CACHE_VERSION, "lo": lo, "hi": hi,
            "label": Path(label_path).name if label_path is not None else None}
    buffer = io.BytesIO()
    np.savez(buffer, codes=codes, regions=volume.regions.astype(np.int16), classes=classes,
             meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return atomic_write(out_path, lambda f: f.write(lzma.compress(buffer.getvalue(), preset=9)))  # whole or absent


def read_pack(path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(meta, 8-bit slice codes, superpixels, per-slice class table); a foreign or damaged
    file is one clear error."""
    path = Path(path)
    try:
        with np.load(io.BytesIO(lzma.decompress(path.read_bytes())), allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            codes, regions, classes = data["codes"], data["regions"], data["classes"]
    except FileNotFoundError:
        raise FewShotSegError(f"slice pack {path} does not exist") from None
    except (lzma.LZMAError, OSError, ValueError, KeyError, json.JSONDecodeError):
        raise FewShotSegError(f"{path} is not a FewShotSeg slice pack (or it is damaged)") from None
    if meta.get("format") != FORMAT or codes.shape != regions.shape or len(classes) != len(codes):
        raise FewShotSegError(f"{path}: slice pack format {meta.get('format')!r} or shapes not understood")
    return meta, codes, regions, classes


def load_pack(path, preprocess: PreprocessConfig, axis: str, exclude_values=()) -> VolumeSlices:
    """A `VolumeSlices` from a pack, without SimpleITK. ``exclude_values``: slices holding ANY
    of these label values take no part (setting 2, strict rule; the pack needs its label)."""
    meta, codes, regions, classes = read_pack(path)
    if meta["preprocess"] != json.loads(json.dumps(preprocess.to_dict())) or meta["axis"] != axis:
        raise FewShotSegError(f"{path}: packed with pre-processing {meta['preprocess']} along {meta['axis']}, "
                              f"but the config asks for {preprocess.to_dict()} along {axis}")
    volume = VolumeSlices.__new__(VolumeSlices)
    volume.image_path, volume.label_path = Path(path), None
    scale = (meta["hi"] - meta["lo"]) / 255.0
    volume.slices = torch.from_numpy(codes.astype(np.float32) * scale + meta["lo"]).contiguous()
    volume.regions = regions
    volume.excluded = frozenset()
    if exclude_values:
        if meta["label"] is None:
            raise FewShotSegError(f"{path}: setting-2 exclusion needs a pack made with its label")
        present = [v for v in exclude_values if v < classes.shape[1]]
        hit = classes[:, present].any(axis=1) if present else np.zeros(len(codes), bool)
        volume.excluded = frozenset(int(i) for i in np.flatnonzero(hit))
    volume.valid = volume._valid_slices()
    volume.pack_meta = meta
    return volume
