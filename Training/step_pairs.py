"""Training examples for the walk's step network (`FewShotSegLib.models.slicestep`).

One example is one step of a walk: a structure's mask on slice z (perturbed, as a walk's
own previous prediction would be), carried onto slice z +- 1 by the pair's demons field,
and the true mask there (empty where the structure has ended). The inputs are built by
the engine's own `step_inputs`, on the engine's own pre-processed slices and fields, so
training sees exactly what a walk will feed the network.

Structures come from label maps (every class a config allows) and, self-supervised, from
3D supervoxels of any volume (SimpleITK's SLIC): a user with unlabeled scans can train
on those alone. Examples are written as one ``.npz`` per volume and axis (inputs float16,
targets uint8), so a run can be resumed or moved to another machine without the scans.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from FewShotSegLib.checkpoints import atomic_write
from FewShotSegLib.imageio import AXES, read_image, read_mask_like
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.models.slicestep import (CROP, crop_box, crop_resized, next_mask_probability, step_inputs,
                                            zero_motion_offset)
from FewShotSegLib.preprocessing import PreprocessConfig, prepare_volume
from FewShotSegLib.registration import FIELD_BATCH, slice_fields, warp_mask

MIN_AREA = 12            # model-grid pixels: smaller slices of a structure are not a step's start
MAX_STEPS_PER_STRUCTURE = 48


def supervoxels(image: sitk.Image, count: int, rng: np.random.Generator, min_voxels: int = 300) -> list[np.ndarray]:
    """Up to ``count`` random SLIC supervoxels (bool arrays) of ``image``, about 15 mm wide."""
    spacing = np.array(image.GetSpacing())
    grid = [max(2, int(round(15.0 / s))) for s in spacing]
    labels = sitk.GetArrayFromImage(sitk.SLIC(sitk.Cast(image, sitk.sitkFloat32), superGridSize=grid,
                                              spatialProximityWeight=5.0, maximumNumberOfIterations=5,
                                              enforceConnectivity=True))
    values, sizes = np.unique(labels, return_counts=True)
    values = values[sizes >= min_voxels]
    chosen = rng.choice(values, size=min(count, values.size), replace=False) if values.size else []
    return [labels == v for v in chosen]


def perturbed(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A walk's previous mask is its own prediction, not the truth: grown, shrunk, shifted
    or with a leak onto the next tissue, so the network learns to correct them."""
    kind = rng.choice(["none", "grow", "shrink", "shift", "leak"], p=[0.25, 0.2, 0.2, 0.15, 0.2])
    radius = int(rng.integers(1, 4))
    if kind == "grow":
        return ndimage.binary_dilation(mask, iterations=radius)
    if kind == "shrink":
        shrunk = ndimage.binary_erosion(mask, iterations=radius)
        return shrunk if shrunk.sum() >= MIN_AREA else mask
    if kind == "shift":
        return np.roll(mask, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
    if kind == "leak":
        edge = np.argwhere(mask & ~ndimage.binary_erosion(mask))
        if len(edge):
            cy, cx = edge[rng.integers(len(edge))]
            r = max(2, int(np.sqrt(mask.sum()) * rng.uniform(0.1, 0.35)))
            yy, xx = np.ogrid[:mask.shape[0], :mask.shape[1]]
            return mask | ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    return mask


class _Fields:
    """The demons fields of a volume's adjacent slice pairs, estimated in batches on demand."""

    def __init__(self, slices: torch.Tensor):
        self.slices, self.fields = slices, {}

    def __call__(self, a: int, b: int) -> torch.Tensor:
        if (a, b) not in self.fields:
            n, d = self.slices.shape[0], b - a
            todo = [(k, k + d) for k in range(a, a + d * FIELD_BATCH, d) if 0 <= k + d < n and 0 <= k < n]
            fixed = self.slices[[t for _, t in todo]]
            moving = self.slices[[s for s, _ in todo]]
            self.fields.update(zip(todo, slice_fields(fixed, moving)))
        return self.fields[(a, b)]


def _example(slices, fields: _Fields, a: int, b: int, prev: np.ndarray, target: torch.Tensor, crop: int):
    """(inputs [4, crop, crop], target [crop, crop], carried mask) of the step a -> b, or None."""
    carried = torch.from_numpy(warp_mask(prev, fields(a, b)))
    prev_t = torch.from_numpy(prev.astype(np.float32))
    box = crop_box(prev_t, carried, slices.shape[-1])
    if box is None:
        return None
    x = step_inputs(slices[a], slices[b], prev_t, carried, box, crop)
    y = crop_resized(target[None], box, crop)[0]
    return x, y, carried


def _stacked(examples: list, crop: int) -> tuple[np.ndarray, np.ndarray]:
    if not examples:
        return np.zeros((0, 4, crop, crop), np.float16), np.zeros((0, crop, crop), np.uint8)
    return (np.stack([x.numpy().astype(np.float16) for x, _ in examples]),
            np.stack([np.round(y.clamp(0, 1).numpy() * 255).astype(np.uint8) for _, y in examples]))


def volume_examples(slices: torch.Tensor, structures: list[torch.Tensor], rng: np.random.Generator,
                    crop: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [n, 4, crop, crop] float16 and targets [n, crop, crop] uint8 (x255) for the
    steps of ``structures`` (model-grid masks [N, size, size]) across ``slices``, each
    from a perturbed true mask."""
    n, fields, examples = slices.shape[0], _Fields(slices), []
    for masks in structures:
        present = [z for z in range(n) if float(masks[z].sum()) >= MIN_AREA]
        steps = [(z, z + d) for z in present for d in (-1, 1) if 0 <= z + d < n]
        if len(steps) > MAX_STEPS_PER_STRUCTURE:
            steps = [steps[i] for i in rng.choice(len(steps), MAX_STEPS_PER_STRUCTURE, replace=False)]
        for a, b in steps:
            found = _example(slices, fields, a, b, perturbed(masks[a].numpy() > 0.5, rng), masks[b], crop)
            if found is not None:
                examples.append(found[:2])
    return _stacked(examples, crop)


def walk_examples(slices: torch.Tensor, structures: list[torch.Tensor], net, crop: int = CROP,
                  past_end: int = 2, zero_motion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The steps a walk of ``net`` really takes: from each structure's largest slice, up
    and down, the previous mask is the network's own last prediction (errors compound
    along a walk; a network trained on true previous masks alone learns to shrink them
    step after step). The walk goes ``past_end`` slices beyond the structure, where the
    target is empty: there the network learns to stop. ``zero_motion``: the walk runs with
    the network's zero-motion offset, as with options.presence: its masks no longer shrink
    towards the end, so the steps past it are the ones a presence output must call ended."""
    n, fields, examples = slices.shape[0], _Fields(slices), []
    for masks in structures:
        areas = masks.flatten(1).sum(1)
        start = int(areas.argmax())
        offset = zero_motion_offset(net, slices[start], (masks[start] > 0.5).float()) if zero_motion else 0.0
        for d in (-1, 1):
            prev, beyond = masks[start].numpy() > 0.5, 0
            for b in range(start + d, n if d > 0 else -1, d):
                a = b - d
                found = _example(slices, fields, a, b, prev, masks[b], crop)
                if found is None:
                    break
                examples.append(found[:2])
                carried = found[2]
                probability = next_mask_probability(net, slices[a], slices[b], torch.from_numpy(prev.astype(np.float32)),
                                                    carried, offset)
                prev = (probability >= 0.5).numpy()
                beyond += float(areas[b]) < MIN_AREA
                if prev.sum() < MIN_AREA or beyond > past_end:
                    break
    return _stacked(examples, crop)


def image_sources(patterns: list[str], count: int, axes: list[str]) -> list[dict]:
    """Sources for unlabeled volumes: every path the globs match (a DICOM series folder
    counts as one volume), ``count`` supervoxels each."""
    sources = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FewShotSegError(f"--images {pattern}: no file or folder matches")
        sources += [{"image": m, "supervoxels": count, "axes": list(axes)} for m in matches]
    return sources


def example_names(sources: list[dict]) -> list[str]:
    """Each source's file-name stem: the image's name, with its folder's name in front
    where two images share a name (scans/s0001/ct.nii.gz, scans/s0002/ct.nii.gz)."""
    stems = [Path(src["image"]).name.split(".")[0] for src in sources]
    names = [f"{Path(src['image']).parent.name}_{stem}" if stems.count(stem) > 1 else stem
             for src, stem in zip(sources, stems)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FewShotSegError(f"two sources would write the same examples ({repeated[0]}); give the images distinct names")
    return names


def build(source: dict, out_dir: Path, seed: int, crop: int = CROP, policy=None, name: str | None = None,
          zero_motion: bool = False) -> list[Path]:
    """One source entry -> one .npz per axis, named ``<name>_<axis>.npz`` (``name``: the
    image's name by default). ``source``: {"image", "label" (optional), "classes" (label
    values to use), "supervoxels" (how many), "axes"}. With a ``policy`` network the
    examples are the steps of its own walks (`walk_examples`)."""
    rng = np.random.default_rng(seed)
    image = read_image(source["image"])
    structures3d = []
    if source.get("label"):
        label = sitk.GetArrayFromImage(read_mask_like(Path(source["label"]), image))
        for value in source.get("classes", []):
            m = label == int(value)
            if m.sum() >= 300:
                structures3d.append(m)
    if policy is None:   # a supervoxel's end is no edge in the image: no walk should learn to stop there
        structures3d += supervoxels(image, int(source.get("supervoxels", 0)), rng)
    written = []
    for axis in source.get("axes", ["axial"]):
        out = out_dir / f"{name or Path(source['image']).name.split('.')[0]}_{axis}.npz"
        if out.exists():
            written.append(out)
            continue
        prepared = prepare_volume(image, axis, PreprocessConfig())
        slices = prepared.slices
        masks = [prepared.mask_to_model(m) for m in structures3d]
        x, y = walk_examples(slices, masks, policy, crop, zero_motion=zero_motion) if policy is not None \
            else volume_examples(slices, masks, rng, crop)
        atomic_write(out, lambda f: np.savez(f, inputs=x, targets=y))
        print(f"{out.name}: {len(x)} steps from {len(masks)} structures", flush=True)
        written.append(out)
    return written


_POLICY: dict = {}


def _load_policy(path):
    """The policy network, loaded once per process."""
    if path is None:
        return None
    if path not in _POLICY:
        from FewShotSegLib.checkpoints import load_checkpoint
        _POLICY[path] = load_checkpoint(path, expect_kind="propagator").model
    return _POLICY[path]


def _build_job(job: tuple) -> list[Path]:
    source, out_dir, seed, crop, policy_path, name, zero_motion = job
    torch.set_num_threads(1)
    return build(source, out_dir, seed, crop, _load_policy(policy_path), name, zero_motion)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Make the step network's training examples")
    parser.add_argument("sources", type=Path, nargs="?", default=None, help="JSON list of sources (see build())")
    parser.add_argument("--images", nargs="+", default=[], metavar="GLOB",
                        help="unlabeled volumes (files, or DICOM series folders): supervoxel examples from each")
    parser.add_argument("--supervoxels", type=int, default=8, help="supervoxels per --images volume (default 8)")
    parser.add_argument("--axes", default="axial", help="for --images: comma-separated of axial, coronal, sagittal")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop", type=int, default=CROP)
    parser.add_argument("--policy", type=Path, default=None,
                        help="a step network checkpoint: record the steps of its own walks instead")
    parser.add_argument("--zero-motion", action="store_true",
                        help="with --policy: its walks run with the zero-motion offset (options.presence's walks)")
    parser.add_argument("--workers", type=int, default=1, help="volumes made at once, one process each (default 1)")
    args = parser.parse_args(argv)
    if args.sources is None and not args.images:
        parser.error("give a sources JSON, --images, or both")
    if args.workers < 1 or args.supervoxels < 1:
        parser.error("--workers and --supervoxels must be at least 1")
    torch.set_num_threads(1)
    try:
        sources = json.loads(args.sources.read_text()) if args.sources is not None else []
        sources += image_sources(args.images, args.supervoxels, [a.strip() for a in args.axes.split(",") if a.strip()])
        names = example_names(sources)
        unknown = [(src["image"], a) for src in sources for a in src.get("axes", ["axial"]) if a not in AXES]
        if unknown:   # before any work: a run that stops half-way has to be started again
            raise FewShotSegError(f"{unknown[0][0]}: unknown axis '{unknown[0][1]}'; choose {', '.join(AXES)}")
        unlabeled = [src["image"] for src in sources if not src.get("label")]
        if args.policy is not None and unlabeled:
            raise FewShotSegError(f"--policy records walks of labelled structures only; {unlabeled[0]} has no label "
                                  "(supervoxels end where the image has no edge: no walk should learn to stop there)")
        if args.zero_motion and args.policy is None:
            raise FewShotSegError("--zero-motion changes the walks of a --policy network; give one")
        if args.policy is not None:
            args.crop = int(_load_policy(args.policy).config["crop"])
        args.out.mkdir(parents=True, exist_ok=True)
        jobs = [(source, args.out, args.seed + k, args.crop, args.policy, name, args.zero_motion)
                for k, (source, name) in enumerate(zip(sources, names))]
        if args.workers == 1:
            for job in jobs:
                _build_job(job)
        else:   # each volume is its own job and its own files: the same examples as one process
            with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
                for _ in pool.map(_build_job, jobs):
                    pass
    except BrokenProcessPool:
        print("step_pairs: error: a worker process died (out of memory?); files written so far are whole, "
              "run again to go on", file=sys.stderr)
        return 2
    except (FewShotSegError, OSError, ValueError, KeyError) as exc:   # every file written so far is whole
        print(f"step_pairs: error: {type(exc).__name__ + ': ' if isinstance(exc, KeyError) else ''}{exc}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
