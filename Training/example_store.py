"""The step network's training examples, memory-mapped from one consolidated file per folder.

Why: `Training.step_pairs` writes one ``.npz`` per source volume; from a thousand scans that
is tens of gigabytes of examples. Loaded into memory, every DDP rank would hold its own
copy of all of them. Consolidated once into two plain ``.npy`` files beside the examples
(``examples.inputs.npy``, ``examples.targets.npy`` and a manifest naming every source file
by size and modification time; for a read-only folder, in the run's folder instead), they
are memory-mapped: a batch reads its 16 examples
from the page cache, which the ranks of a machine share, and a later run (or ``--resume``)
starts at once. A folder whose files changed is consolidated again.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from FewShotSegLib.checkpoints import atomic_write
from FewShotSegLib.errors import FewShotSegError
from Training.provenance import display_path

PREFIX = "examples"
FORMAT = 1


def _shapes(path: Path) -> dict:
    """Each array's (shape, dtype) in an .npz, from the headers alone (no data read)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in ("inputs.npy", "targets.npy"):
                with archive.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                        else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[name[:-4]] = (tuple(shape), np.dtype(dtype))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        raise FewShotSegError(f"{path} is not a step-example file of Training.step_pairs (or it is damaged)") from None
    return out


def _manifest(files: list[Path]) -> list[dict]:
    return [{"name": f.name, "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def _paths(folder: Path, spare: Path | None = None) -> tuple[Path, Path, Path]:
    """Where a folder's consolidated files live: in it, or, where it is read-only (a shared
    collection), in ``spare`` under a name made from the folder's path."""
    where, stem = Path(folder), PREFIX
    if spare is not None and not os.access(where, os.W_OK):
        where = Path(spare)
        stem = f"{PREFIX}-{hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:12]}"
    return where / f"{stem}.inputs.npy", where / f"{stem}.targets.npy", where / f"{stem}.json"


def consolidate(folder: Path, spare: Path | None = None) -> None:
    """Write the folder's consolidated arrays, unless they are there for exactly these files."""
    folder = Path(folder)
    files = sorted(folder.glob("*.npz"))
    inputs_path, targets_path, manifest_path = _paths(folder, spare)
    if not files:
        return
    manifest = {"format": FORMAT, "files": _manifest(files)}
    try:
        if json.loads(manifest_path.read_text())["files"] == manifest["files"]:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shapes = [_shapes(f) for f in files]
    counts = [s["inputs"][0][0] for s in shapes]
    for f, s in zip(files, shapes):
        if s["inputs"][0][1:] != shapes[0]["inputs"][0][1:] or s["targets"][0][0] != s["inputs"][0][0]:
            raise FewShotSegError(f"{f}: examples of shape {s['inputs'][0]} do not match "
                                  f"{files[0].name}'s {shapes[0]['inputs'][0]}")
    manifest["counts"] = [int(c) for c in counts]

    def write(name: str, target: Path, shape: tuple, dtype):
        def fill(handle):
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": (sum(counts),) + tuple(shape)}
            np.lib.format.write_array_header_2_0(handle, header)
            for f in files:                             # one source file in memory at a time
                with np.load(f) as data:
                    handle.write(np.ascontiguousarray(data[name], dtype=dtype).tobytes())
        atomic_write(target, fill, shared=True)

    write("inputs", inputs_path, shapes[0]["inputs"][0][1:], shapes[0]["inputs"][1])
    write("targets", targets_path, shapes[0]["targets"][0][1:], shapes[0]["targets"][1])
    atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest).encode()), shared=True)   # last: complete


class ExampleStore:
    """Every example of some folders: inputs [n, 4, c, c] float16, targets [n, c, c] uint8,
    memory-mapped; ``batch(index)`` gathers rows across folders."""

    def __init__(self, folders: list[Path], oversample: dict | None = None, spare: Path | None = None):
        """``oversample``: a file-name glob -> weight, e.g. {"image_*": 4} to draw a scarce
        modality's examples more often. Call `consolidate` on each folder first (rank 0),
        with the same ``spare``."""
        self.inputs, self.targets, self.files, weights = [], [], [], []
        for folder in map(Path, folders):
            if not any(folder.glob("*.npz")):
                continue
            inputs_path, targets_path, manifest_path = _paths(folder, spare)
            try:
                manifest = json.loads(manifest_path.read_text())
                inputs = np.load(inputs_path, mmap_mode="r")
                targets = np.load(targets_path, mmap_mode="r")
            except (OSError, ValueError, KeyError):
                raise FewShotSegError(f"{folder}: the consolidated examples are missing or damaged") from None
            if len(inputs) != sum(manifest["counts"]) or len(targets) != len(inputs):
                raise FewShotSegError(f"{folder}: the consolidated examples do not match their manifest")
            self.inputs.append(inputs)
            self.targets.append(targets)
            for entry, count in zip(manifest["files"], manifest["counts"]):
                self.files.append(display_path(folder / entry["name"]))
                weight = max([w for pattern, w in (oversample or {}).items()
                              if fnmatch.fnmatch(entry["name"], pattern)], default=1.0)
                weights.append(torch.full((count,), float(weight)))
        if not self.files:
            raise FewShotSegError(f"no step examples (.npz) in {', '.join(map(str, folders))}")
        self.weights = torch.cat(weights)
        self.starts = np.cumsum([0] + [len(a) for a in self.inputs])
        self.crop = int(self.inputs[0].shape[-1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs float32 [b, 4, c, c], targets float32 [b, 1, c, c] in [0, 1]) of these rows."""
        index = np.asarray(index, np.int64)
        parts = np.searchsorted(self.starts, index, side="right") - 1
        x = np.empty((len(index),) + self.inputs[0].shape[1:], np.float32)
        y = np.empty((len(index),) + self.targets[0].shape[1:], np.float32)
        for part in np.unique(parts):                  # one gather per folder, rows in order
            at = np.flatnonzero(parts == part)
            rows = index[at] - self.starts[part]
            order = np.argsort(rows, kind="stable")
            x[at[order]] = self.inputs[part][rows[order]]
            y[at[order]] = self.targets[part][rows[order]]
        return torch.from_numpy(x), torch.from_numpy(y)[:, None] / 255.0
