"""The few-shot training's volume cache filled ahead of training (`Training/train.py`).

Why: a large collection's superpixels take about 5 s per CHAOS-T2 volume and a minute per
CT on one core; computed once, in several processes, a start only memory-maps files
(`Training.episodes.VolumeSlices`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from FewShotSegLib.preprocessing import PreprocessConfig
from Training.episodes import VolumeSlices


class VolumeProgress:
    """A bar over the training volumes on rank 0: the first run computes each volume's
    superpixels (about 2 minutes for CHAOS-T2's 20 scans on a laptop CPU) before step 1;
    later runs read them from the cache in seconds."""

    def __init__(self, images: list, rank: int):
        self.bar = None
        if rank == 0 and images:
            from tqdm import tqdm
            self.bar = tqdm(total=len(images), unit="volume", file=sys.stderr, leave=False,
                            desc="train: preparing volumes (superpixels, cached)")

    def slice_done(self, image):
        if self.bar is None:
            return None
        self.bar.set_postfix_str(Path(image).name)
        bar = self.bar

        def update(done: int, total: int) -> None:
            bar.set_postfix_str(f"{Path(image).name}: slice {done}/{total}")
            if done == total:
                bar.update(1)
        return update

    def volume_done(self, image) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(Path(image).name)
            self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _cache_volume(job: tuple) -> str:
    """One volume into the cache, in a worker process of `fill_cache`."""
    image, preprocess, axis, cache = job
    torch.set_num_threads(1)
    VolumeSlices(Path(image), PreprocessConfig.from_dict(preprocess), axis, Path(cache))
    return image


def fill_cache(images: list, preprocess: PreprocessConfig, axis: str, cache, rank: int = 0,
               workers: int = 1) -> None:
    """Compute what is not cached yet of ``images`` (superpixels: about 5 s per CHAOS-T2 volume,
    a minute per CT on one core), ``workers`` processes at once; then a start only maps files."""
    with VolumeProgress(images, rank) as bar:
        if workers <= 1:
            for p in images:
                VolumeSlices(p, preprocess, axis, cache, progress=bar.slice_done(p))
            return
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context
        jobs = [(str(p), preprocess.to_dict(), axis, str(cache)) for p in images]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for done in pool.map(_cache_volume, jobs):
                bar.volume_done(done)
