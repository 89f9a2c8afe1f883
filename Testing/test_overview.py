"""FewShotSegLib.overview: figures in radiological view, small enough to commit."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegLib.overview import MAX_PNG_BYTES, overlay, radiological, save_overview, view_letters

# LPS direction matrices (columns = world direction of index axes i, j, k)
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
RAS_STORED = (-1, 0, 0, 0, -1, 0, 0, 0, 1)          # a NIfTI written in RAS, read as LPS
CORONAL_STACK = (1, 0, 0, 0, 0, 1, 0, -1, 0)        # i -> left, j -> inferior, k -> posterior


def _marked(direction) -> tuple[sitk.Image, np.ndarray]:
    """A 6x8x10 volume whose voxel nearest the patient's right-anterior-superior corner is 1."""
    array = np.zeros((6, 8, 10), np.float32)
    d = np.asarray(direction, float).reshape(3, 3)
    # index of the voxel whose world position is most right (-x), anterior (-y), superior (+z)
    size = np.array([10, 8, 6])
    score = np.array([-1, -1, 1]) @ d                    # how each index axis moves toward R, A, S
    ijk = [(s - 1) if score[k] > 0 else 0 for k, s in enumerate(size)]
    array[ijk[2], ijk[1], ijk[0]] = 1
    image = sitk.GetImageFromArray(array)
    image.SetDirection(direction)
    return image, array


@pytest.mark.parametrize("direction", [IDENTITY, RAS_STORED])
def test_axial_slice_puts_the_patients_right_on_the_left_and_anterior_up(direction):
    image, array = _marked(direction)
    k = int(np.argwhere(array)[0][0])
    view = radiological(array[k], image, 0)
    assert view[0, 0] == 1                           # top-left: anterior, patient's right
    assert view_letters(image, 0) == ("A", "P", "R", "L")


def test_coronal_slice_of_a_permuted_volume_puts_superior_up():
    image, array = _marked(CORONAL_STACK)
    k = int(np.argwhere(array)[0][0])
    view = radiological(array[k], image, 0)          # array axis 0 runs posterior: a coronal slice
    assert view.shape == (8, 10) and view[0, 0] == 1  # top-left: superior, patient's right
    assert view_letters(image, 0) == ("S", "I", "R", "L")


def test_overview_has_a_legend_and_stays_under_the_commit_limit(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(256, 256))                  # the worst case for compression
    mask = np.zeros((256, 256), bool)
    mask[60:120, 80:160] = True
    tiles = [("slice 3, painted", overlay(noise, {"support": mask})),
             ("slice 5, Dice 0.90", overlay(noise, {"label": mask, "prediction": mask}))]
    path = save_overview(tmp_path / "o.png", [("liver (Dice 0.9)", tiles)] * 4, letters=("A", "P", "R", "L"),
                         title="test")
    from PIL import Image
    image = np.asarray(Image.open(path).convert("RGB"))
    legend = image[-22:]
    for colour in ((60, 140, 255), (60, 220, 60), (230, 50, 50)):
        assert (legend == colour).all(axis=2).any(), colour
    assert path.stat().st_size < MAX_PNG_BYTES
