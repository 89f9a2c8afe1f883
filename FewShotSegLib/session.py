"""What a propagation can keep for the next one on the same volume: the interactive loop.

A user paints, propagates, corrects one slice and propagates again, many times. The
second run differs from the first only in the spans next to the corrected slice, so a
`PropagationSession` passed to every run keeps
  * the pre-processed volume and its model-grid slices,
  * the encoded features of recent slices and the demons fields of slice pairs (they
    depend on the images only),
  * every walk, keyed by what it depends on (its anchor's mask, its slices, the
    exclusions on them and the options); a walk whose key is unchanged is reused. The
    least recently used walks go first, beyond 64 walks or 256 MB of probabilities.
It resets itself when the image, the model, the axis or the options differ.
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .walks import FeatureCache, FieldCache, SliceImages, Walk

# options that change what a walk produces (batch size, threads and device do not)
WALK_OPTIONS = ("mode", "threshold", "search_margin_mm", "min_area_fraction", "registration_weight",
                "registration_shrink", "registration_iterations", "registration_coarse_shrink",
                "min_intensity_agreement",
                "query_prototypes", "support_refinement_steps", "multi_scale", "adapt_steps", "stop",
                "walk_step_mm", "step_registration_weight", "zero_motion_max_mm", "presence")
KEEP_WALKS = 64
KEEP_WALK_BYTES = 256 << 20      # the walks' probabilities kept, at most (256 KB a 256x256 slice)
MAX_STRUCTURES_KEPT = 4          # several structures at once: the bound grows up to 4x (1 GB)


def image_fingerprint(image: sitk.Image) -> tuple:
    """Geometry and a checksum of the voxels: the same scan loaded twice gives the same
    fingerprint; any edit of the image gives another."""
    array = sitk.GetArrayViewFromImage(image)
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
            image.GetPixelIDValue(), zlib.crc32(flat))


def digest(array) -> str:
    """A short content key for a mask or a stack of masks."""
    a = np.ascontiguousarray(np.asarray(array))
    return hashlib.blake2b(a.tobytes() + str(a.shape).encode(), digest_size=12).hexdigest()


class PropagationSession:
    """Pass the same session to every `propagate` call on one volume (and one structure,
    or several: walks are keyed by their anchors' masks)."""

    def __init__(self):
        self.key: Optional[tuple] = None
        self.image = None
        self._fingerprint: Optional[tuple] = None
        self.prepared = None
        self.slices: Optional[SliceImages] = None
        self.features: Optional[FeatureCache] = None
        self.fields: Optional[FieldCache] = None
        self.walks: dict[tuple, Walk] = {}
        self.chains: dict[tuple, list] = {}  # (painted slice, its mask, upward) -> the steps walked
        self.reused = self.computed = 0     # walks, in the last run
        self.keep_walks, self.keep_bytes = KEEP_WALKS, KEEP_WALK_BYTES

    def hold_structures(self, count: int) -> None:
        """Keep the walks of ``count`` structures (propagated together, one after another).
        Why: the cache is least-recently-used, and one structure's walks each pushed out the
        next one's, so a correction of one of fourteen CT structures recomputed them all
        (11 s, as the first run); the bound grows with the count, up to 4x."""
        factor = max(1, min(int(count), MAX_STRUCTURES_KEPT))
        self.keep_walks, self.keep_bytes = KEEP_WALKS * factor, KEEP_WALK_BYTES * factor

    def _same_image(self, image: sitk.Image) -> bool:
        """The same object, or the same voxels and geometry (checksummed only then: a CT
        takes about 0.1 s)."""
        if self.image is None or image is self.image:
            return image is self.image
        if self._fingerprint is None:
            self._fingerprint = image_fingerprint(self.image)
        return image_fingerprint(image) == self._fingerprint

    def open(self, image: sitk.Image, model, axis_index: int, options, make_prepared) -> None:
        """Keep the caches when the same image, model, axis and options come again."""
        model_id = id(getattr(model, "model", model)) if model is not None else None
        preprocess = repr(getattr(model, "preprocess", None))
        walk_options = tuple(getattr(options, name) for name in WALK_OPTIONS)
        key = (model_id, preprocess, axis_index, walk_options, str(options.device))
        self.reused = self.computed = 0
        same_image = self._same_image(image)
        if same_image and key == self.key:
            self.image = image
            return
        if not same_image:
            self._fingerprint = None
        self.key, self.image, self.walks, self.chains = key, image, {}, {}
        self.prepared = make_prepared()
        self.slices = SliceImages(self.prepared)
        self.features = None
        self.fields = FieldCache(self.slices, options.registration_shrink, options.registration_iterations,
                                 options.registration_coarse_shrink)

    def feature_cache(self, net, device, batch_size: int) -> FeatureCache:
        if self.features is None or self.features.net is not net:
            self.features = FeatureCache(net, self.slices, device, batch_size)
        self.features.batch_size = batch_size
        return self.features

    def steps(self, key: tuple) -> list:
        """The steps walked so far from one painted slice (and mask) in one direction: a
        longer walk from there continues them (`walks.walk`'s ``memory``)."""
        if key not in self.chains:
            self.chains[key] = []
            while len(self.chains) > self.keep_walks:
                self.chains.pop(next(iter(self.chains)))
        else:
            self.chains[key] = self.chains.pop(key)
        return self.chains[key]

    def walk(self, key: tuple, compute) -> Walk:
        """The cached walk for ``key``, or ``compute()``'s, kept for next time."""
        if key in self.walks:
            self.reused += 1
            self.walks[key] = self.walks.pop(key)     # most recently used last
            return self.walks[key]
        result = compute()
        self.computed += 1
        self.walks[key] = result
        while len(self.walks) > 1 and (len(self.walks) > self.keep_walks or self._walk_bytes() > self.keep_bytes):
            self.walks.pop(next(iter(self.walks)))
            if len(self.chains) > 1:
                self.chains.pop(next(iter(self.chains)))
        return result

    def _walk_bytes(self) -> int:
        """Bytes of the probabilities held (a step kept by a walk and a chain counts once)."""
        held = {id(p): p for w in self.walks.values() for p in w.probs.values()}
        held.update((id(step[2]), step[2]) for steps in self.chains.values() for step in steps)
        return sum(p.numel() * p.element_size() for p in held.values())
