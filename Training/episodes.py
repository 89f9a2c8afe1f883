"""Self-supervised (and supervised) few-shot episodes from volumes.

SSL-ALPNet's recipe: Felzenszwalb superpixels of each slice are pseudo-labels; an episode
takes one superpixel as the "organ", and support and query are two independent random
augmentations of the slice. Optionally the query is the neighbouring slice, with the
superpixel there that overlaps most (adjacent-slice episodes: closer to what propagation
asks of the model). Label files give supervised episodes the same way. Label files can
also keep slices out of training altogether (``exclude_labels``: few-shot setting 2).

Slices come from `FewShotSegLib.preprocessing.prepare_volume`, the code path inference
uses, so the model sees in training exactly what it sees in Slicer. Every episode is a
pure function of (seed, rank, step, index): resuming reproduces the same data, the
number of DataLoader workers does not matter, and each DDP rank draws its own episodes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from FewShotSegLib.augmentation import AugmentConfig, augment  # noqa: F401  (the episodes' augmentation)
from FewShotSegLib.checkpoints import atomic_write
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.preprocessing import PreprocessConfig, body_mask, prepare_volume

SUPERPIXEL_PARAMS = {"scale": 1.0, "sigma": 1.0, "min_size": 400}
MIN_REGION_PX = 200          # a pseudo-organ smaller than this teaches nothing useful
CACHE_VERSION = 3


def superpixels(slice2d: np.ndarray) -> np.ndarray:
    """Felzenszwalb superpixels of a [0,255]-scaled slice, 0 outside the body, int16."""
    lo, hi = float(slice2d.min()), float(slice2d.max())
    scaled = (slice2d - lo) / max(hi - lo, 1e-6) * 255.0
    seg = felzenszwalb(scaled, **SUPERPIXEL_PARAMS).astype(np.int32) + 1
    body = body_mask(slice2d)
    # a superpixel belongs to the body when most of it lies inside
    inside = ndimage.mean(body, seg, index=np.arange(1, seg.max() + 1))
    keep = np.zeros(seg.max() + 1, bool)
    keep[1:] = np.asarray(inside) > 0.5
    seg[~keep[seg]] = 0
    return seg.astype(np.int16)


def excluded_slices(label_path: Path, image, axis_index: int, values) -> frozenset:
    """Indices of the slices (along ``axis_index``) whose label holds ANY of ``values``.

    Few-shot "setting 2" keeps test classes out of training entirely. The strict rule
    (SSL-ALPNet) drops a slice when any test class is present in it; the lenient rule of
    the RPT/Q-Net family (all of them present) removes almost nothing, so we do not use
    it. The label is resampled onto the image grid (nearest) when the grids differ.
    """
    import SimpleITK as sitk
    from FewShotSegLib.imageio import read_mask_like
    label = sitk.GetArrayFromImage(read_mask_like(Path(label_path), image))
    hit = np.isin(label, np.asarray(list(values), dtype=np.int64))
    per_slice = hit.any(axis=tuple(a for a in range(3) if a != axis_index))
    return frozenset(int(i) for i in np.flatnonzero(per_slice))


class VolumeSlices:
    """One volume's pre-processed slices and its pseudo-labels (or labels), cached on disk.

    With a cache folder the slices and regions live there as plain ``.npy`` files and are
    memory-mapped, with a small per-slice table of region sizes beside them: a later start
    reads neither the scan nor every region (seconds for a thousand volumes, not an hour),
    and the data stay in the page cache, shared by the DDP ranks of a machine, instead of
    a private copy of every volume in each rank's memory.
    """

    def __init__(self, image_path: Path, preprocess: PreprocessConfig, axis: str,
                 cache_dir: Path | None, label_path: Path | None = None,
                 exclude_labels: tuple | None = None, progress=None):
        """``exclude_labels``: ``(label file, values)``; slices whose label contains ANY of
        the values take no part in any episode (few-shot setting 2, see `excluded_slices`).
        ``progress(done, total)`` follows the superpixels, slice by slice (seconds per volume
        when they are not cached yet)."""
        from FewShotSegLib.imageio import read_image  # SimpleITK: not needed for slice packs
        self.image_path, self.label_path = Path(image_path), label_path and Path(label_path)
        self.excluded: frozenset = frozenset()
        self._cache_stem = None
        if cache_dir is not None:
            self._cache_stem = Path(cache_dir) / f"{self.image_path.name.split('.')[0]}_{self._cache_key(preprocess, axis)}"
        table = self._open_cache()
        image = None
        if table is None:
            image = read_image(self.image_path)
            prepared = prepare_volume(image, axis, preprocess)
            n = prepared.shape[prepared.axis_index]
            self.slices = prepared.model_slices(list(range(n))).float().contiguous()  # [N,S,S]
            if self.label_path is not None:
                self.regions = self._label_regions(prepared, image)
            else:
                self.regions = self._superpixels(cache_dir, preprocess, axis, progress)
            self.axis_index = prepared.axis_index
            table = region_table(self.regions)
            if self._cache_stem is not None:
                self._write_cache(table)
                table = self._open_cache() or table
        if exclude_labels is not None:
            image = image if image is not None else read_image(self.image_path)
            self.excluded = excluded_slices(exclude_labels[0], image, self.axis_index, exclude_labels[1])
        self.valid = self._valid_slices(table)

    def _cache_key(self, preprocess: PreprocessConfig, axis: str, version: int = CACHE_VERSION) -> str:
        stat = self.image_path.stat()
        parts = [str(self.image_path.resolve()), stat.st_size, stat.st_mtime_ns,
                 preprocess.to_dict(), axis, SUPERPIXEL_PARAMS, version]
        if self.label_path is not None:             # labels instead of superpixels: their own entry
            label = self.label_path.stat()
            parts += [str(self.label_path.resolve()), label.st_size, label.st_mtime_ns]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]

    def _cache_files(self) -> tuple[Path, Path, Path]:
        """(slices .npy, regions .npy, table .npz); the table is written last: it marks a
        complete entry."""
        stem = self._cache_stem
        return (stem.with_name(stem.name + ".slices.npy"), stem.with_name(stem.name + ".regions.npy"),
                stem.with_name(stem.name + ".npz"))

    def _open_cache(self):
        """Memory-map a complete cache entry; its region table, or None (absent, truncated
        or foreign: then it is recomputed)."""
        if self._cache_stem is None:
            return None
        slices_path, regions_path, table_path = self._cache_files()
        if not table_path.is_file():
            return None
        try:
            with np.load(table_path) as cached:
                table = tuple(cached[k] for k in ("slice_of", "ids", "counts"))
                axis_index = int(cached["axis_index"])
            slices = np.load(slices_path, mmap_mode="c")       # copy-on-write: writable, never written
            regions = np.load(regions_path, mmap_mode="c")
        except (OSError, ValueError, KeyError):
            return None
        if slices.dtype != np.float32 or regions.dtype != np.int16 or slices.ndim != 3 \
                or slices.shape != regions.shape:
            return None
        self.slices, self.regions, self.axis_index = torch.from_numpy(slices), regions, axis_index
        return table

    def _write_cache(self, table) -> None:
        slices_path, regions_path, table_path = self._cache_files()
        # unique temporary names: several DDP ranks may fill the same cache at once
        atomic_write(slices_path, lambda f: np.save(f, self.slices.numpy()), shared=True)
        atomic_write(regions_path, lambda f: np.save(f, np.asarray(self.regions, np.int16)), shared=True)
        atomic_write(table_path, lambda f: np.savez(f, slice_of=table[0], ids=table[1], counts=table[2],
                                                    axis_index=self.axis_index), shared=True)

    def _label_regions(self, prepared, image) -> np.ndarray:
        import SimpleITK as sitk
        from FewShotSegLib.imageio import read_mask_like
        label = sitk.GetArrayFromImage(read_mask_like(self.label_path, image))
        values = [int(v) for v in np.unique(label) if v != 0]
        regions = torch.zeros(self.slices.shape, dtype=torch.int16)
        for value in values:
            regions[prepared.mask_to_model(label == value) > 0.5] = value
        return regions.numpy()

    def _superpixels(self, cache_dir, preprocess, axis, progress=None) -> np.ndarray:
        """Felzenszwalb superpixels of every slice; those of the previous cache format are
        reused (hours of work for a large collection)."""
        if cache_dir is not None:
            old = Path(cache_dir) / f"{self.image_path.name.split('.')[0]}_{self._cache_key(preprocess, axis, 2)}.npz"
            try:
                with np.load(old) as cached:
                    regions = cached["regions"]
                if regions.shape == tuple(self.slices.shape) and regions.dtype == np.int16:
                    return regions
            except (OSError, ValueError, KeyError):
                pass
        slices = self.slices.numpy()
        regions = []
        for s in slices:
            regions.append(superpixels(s))
            if progress is not None:
                progress(len(regions), len(slices))
        return np.stack(regions)

    def _valid_slices(self, table=None) -> list[tuple[int, np.ndarray]]:
        """(slice, region ids large enough to be an episode's organ)."""
        slice_of, ids, counts = table if table is not None else region_table(self.regions)
        keep = counts >= MIN_REGION_PX
        slice_of, ids = slice_of[keep], ids[keep]         # sorted by slice
        starts = np.flatnonzero(np.r_[True, slice_of[1:] != slice_of[:-1]]) if slice_of.size else []
        return [(int(slice_of[a]), group) for a, group in zip(starts, np.split(ids, starts[1:]))
                if int(slice_of[a]) not in self.excluded]

    def __getstate__(self):
        """A cached volume travels (to spawned DataLoader workers) as its cache's path, not
        as a copy of its data."""
        state = dict(self.__dict__)
        if getattr(self, "_cache_stem", None) is not None and isinstance(self.regions, np.memmap):
            state["slices"] = state["regions"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.slices is None:
            if self._open_cache() is None:
                raise FewShotSegError(f"the training cache {self._cache_stem} vanished while training")


def region_table(regions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (slice, region id, voxel count) of a [N,S,S] region volume (0 = no region)."""
    slice_of, ids, counts = [], [], []
    for i, reg in enumerate(regions):
        values, n = np.unique(reg[reg > 0], return_counts=True)
        slice_of.append(np.full(values.size, i, np.int32))
        ids.append(values.astype(np.int32))
        counts.append(n.astype(np.int32))
    return (np.concatenate(slice_of) if slice_of else np.zeros(0, np.int32),
            np.concatenate(ids) if ids else np.zeros(0, np.int32),
            np.concatenate(counts) if counts else np.zeros(0, np.int32))


class EpisodeSampler:
    """Draws episodes: deterministic in (seed, rank, step, index)."""

    def __init__(self, volumes: list[VolumeSlices], augment_cfg: AugmentConfig, seed: int = 0,
                 rank: int = 0, adjacent_probability: float = 0.0,
                 label_probability: float | None = None):
        """``label_probability``: share of episodes drawn from labelled volumes when both
        kinds are given (None: every volume equally likely)."""
        self.volumes = [v for v in volumes if v.valid]
        if not self.volumes:
            raise ValueError("no volume has a region large enough for an episode")
        self.augment_cfg, self.seed, self.rank = augment_cfg, seed, rank
        self.adjacent_probability = adjacent_probability
        self.label_probability = label_probability
        self._labelled = [v for v in self.volumes if v.label_path is not None]
        self._unlabelled = [v for v in self.volumes if v.label_path is None]

    def _generator(self, step: int, index: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(hash((self.seed, self.rank, step, index)) & 0x7FFFFFFFFFFF)
        return g

    def episode(self, step: int, index: int = 0):
        """(support image, support mask, query image, query mask), each ``[S,S]`` float."""
        g = self._generator(step, index)
        pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
        pool = self.volumes
        if self.label_probability is not None and self._labelled and self._unlabelled:
            labelled = float(torch.rand((), generator=g)) < self.label_probability
            pool = self._labelled if labelled else self._unlabelled
        vol = pool[pick(len(pool))]
        s_idx, ids = vol.valid[pick(len(vol.valid))]
        region = int(ids[pick(len(ids))])
        s_img, s_mask = vol.slices[s_idx], torch.from_numpy(vol.regions[s_idx] == region).float()
        q_idx, q_mask = s_idx, s_mask
        if self.adjacent_probability > 0 and float(torch.rand((), generator=g)) < self.adjacent_probability:
            q_idx, q_mask = self._adjacent(vol, s_idx, s_mask, pick(2) * 2 - 1, region)
        q_img = vol.slices[q_idx]
        s_img, s_mask = augment(s_img, s_mask, self.augment_cfg, g)
        q_img, q_mask = augment(q_img, q_mask, self.augment_cfg, g)
        return s_img, s_mask, q_img, q_mask

    @staticmethod
    def _adjacent(vol: VolumeSlices, index: int, mask: torch.Tensor, direction: int, region: int = 0):
        """The query on the neighbouring slice: a label keeps its value there; a superpixel
        becomes the neighbour's superpixel that overlaps it most (IoU >= 0.3). Otherwise
        the same slice (the classic episode)."""
        j = index + direction
        if not 0 <= j < len(vol.regions) or j in getattr(vol, "excluded", ()):
            return index, mask
        reg = vol.regions[j]
        if vol.label_path is not None:
            cand = reg == region
            if cand.sum() < MIN_REGION_PX:
                return index, mask
            return j, torch.from_numpy(cand).float()
        m = mask.numpy() > 0.5
        ids, counts = np.unique(reg[m & (reg > 0)], return_counts=True)
        if ids.size == 0:
            return index, mask
        best = int(ids[np.argmax(counts)])
        cand = reg == best
        iou = (cand & m).sum() / max((cand | m).sum(), 1)
        if iou < 0.3:
            return index, mask
        return j, torch.from_numpy(cand).float()

    def batch(self, step: int, size: int):
        eps = [self.episode(step, i) for i in range(size)]
        return [torch.stack(t) for t in zip(*eps)]


class EpisodeDataset(torch.utils.data.Dataset):
    """Item ``i`` = the batch of step ``start + i``: a DataLoader's workers build episodes
    ahead of the training loop, and the result does not depend on how many there are."""

    def __init__(self, sampler: EpisodeSampler, start: int, steps: int, batch_size: int):
        self.sampler, self.start, self.batch_size = sampler, int(start), int(batch_size)
        self.length = max(0, int(steps) - self.start)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.sampler.batch(self.start + i, self.batch_size)


def worker_init(_worker_id: int) -> None:
    """One thread per DataLoader worker (they must not fight the training threads); Ctrl-C
    and SIGTERM are the main process's business (it stops cleanly and ends the workers)."""
    import signal
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
