"""The step network's examples, consolidated once per folder and memory-mapped
(Training/example_store.py): what lets a thousand scans' examples train on eight ranks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from FewShotSegLib.errors import FewShotSegError
from Training.example_store import ExampleStore, consolidate


def _write(folder, name: str, n: int, seed: int, crop: int = 16):
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((n, 4, crop, crop)).astype(np.float16)
    targets = rng.integers(0, 256, (n, crop, crop)).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, inputs=inputs, targets=targets)      # what Training.step_pairs writes
    return inputs, targets


def test_rows_across_folders_are_the_files_rows(tmp_path):
    a1 = _write(tmp_path / "a", "one.npz", 5, 0)
    a2 = _write(tmp_path / "a", "two.npz", 3, 1)
    b1 = _write(tmp_path / "b", "image_1.npz", 4, 2)
    for folder in ("a", "b"):
        consolidate(tmp_path / folder)
    store = ExampleStore([tmp_path / "a", tmp_path / "b"], {"image_*": 3})
    assert len(store) == 12 and store.crop == 16 and len(store.files) == 3
    assert all(isinstance(part, np.memmap) for part in store.inputs + store.targets)
    assert store.weights.tolist() == [1.0] * 8 + [3.0] * 4
    x, y = store.batch(torch.tensor([0, 6, 11, 5]))
    expected_x = np.stack([a1[0][0], a2[0][1], b1[0][3], a2[0][0]]).astype(np.float32)
    expected_y = np.stack([a1[1][0], a2[1][1], b1[1][3], a2[1][0]]).astype(np.float32)[:, None] / 255.0
    assert x.dtype == torch.float32 and x.shape == (4, 4, 16, 16) and y.shape == (4, 1, 16, 16)
    np.testing.assert_array_equal(x.numpy(), expected_x)
    np.testing.assert_allclose(y.numpy(), expected_y, rtol=1e-6)


def test_consolidation_is_reused_and_redone_when_the_files_change(tmp_path):
    folder = tmp_path / "ex"
    _write(folder, "one.npz", 5, 0)
    consolidate(folder)
    stamp = (folder / "examples.inputs.npy").stat().st_mtime_ns
    consolidate(folder)                                   # a resumed run: nothing rewritten
    assert (folder / "examples.inputs.npy").stat().st_mtime_ns == stamp
    extra = _write(folder, "two.npz", 2, 1)
    consolidate(folder)
    store = ExampleStore([folder])
    assert len(store) == 7
    np.testing.assert_array_equal(store.batch(torch.tensor([6]))[0].numpy()[0], extra[0][1].astype(np.float32))


def test_bad_example_files_are_one_clear_error_and_write_nothing(tmp_path):
    folder = tmp_path / "ex"
    _write(folder, "one.npz", 5, 0)
    (folder / "two.npz").write_bytes(b"not a zip")
    with pytest.raises(FewShotSegError, match="two.npz is not a step-example file"):
        consolidate(folder)
    assert not list(folder.glob("examples.*"))
    (folder / "two.npz").unlink()
    _write(folder, "two.npz", 2, 1, crop=24)             # another crop size: cannot be one array
    with pytest.raises(FewShotSegError, match="do not match"):
        consolidate(folder)
    with pytest.raises(FewShotSegError, match="no step examples"):
        ExampleStore([tmp_path / "empty"])


def test_a_read_only_folder_is_consolidated_in_the_run_folder(tmp_path, monkeypatch):
    """A shared, read-only collection: its consolidation goes to the run's folder. (The
    permission is reported as missing, as it is for a user who cannot write there; these
    tests may run as root, which writes anywhere.)"""
    import Training.example_store as store_module
    shared = tmp_path / "shared"
    expected = _write(shared, "one.npz", 4, 0)
    real_access = os.access
    monkeypatch.setattr(store_module.os, "access",
                        lambda path, mode: False if Path(path) == shared else real_access(path, mode))
    consolidate(shared, spare=tmp_path / "run")
    store = ExampleStore([shared], spare=tmp_path / "run")
    assert not list(shared.glob("examples*")) and len(list((tmp_path / "run").glob("examples-*.npy"))) == 2
    np.testing.assert_array_equal(store.batch(torch.tensor([3]))[0].numpy()[0], expected[0][3].astype(np.float32))
