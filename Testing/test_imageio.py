"""imageio: reading, geometry round trips, mask alignment, atomic writing, bad inputs."""
from __future__ import annotations

import gzip
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegLib import imageio
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.imageio import (array_axis_for, label_image_like, read_image, read_mask_like,
                                   same_grid, select_label, write_image)


# ----------------------------------------------------------------------------- helpers
def make_image(shape=(6, 7, 8), spacing=(0.7, 0.9, 2.5), origin=(10.0, -20.0, 30.0),
               direction=None, dtype=np.float32, seed=0) -> sitk.Image:
    """A random image; ``shape`` in array order (k, j, i)."""
    rng = np.random.default_rng(seed)
    arr = (rng.normal(100, 50, shape)).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return img


def rotation(ax_deg=20.0, ay_deg=-35.0, az_deg=50.0) -> np.ndarray:
    ax, ay, az = (math.radians(a) for a in (ax_deg, ay_deg, az_deg))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol=1e-5):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6, atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=atol)


def files_in(folder: Path) -> set:
    return {p.name for p in folder.iterdir()}


# ----------------------------------------------------------------------------- geometry round trips
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["identity", "flipped", "oblique"])
def test_write_read_round_trip_keeps_geometry_and_voxels(tmp_path, ext, kind):
    direction = {"identity": None, "flipped": np.diag([-1.0, 1.0, -1.0]), "oblique": rotation()}[kind]
    img = make_image(direction=direction)
    label = ext == ".seg.nrrd"
    if label:
        img = sitk.Cast(sitk.RescaleIntensity(img, 0, 3), sitk.sitkUInt8)
    out = write_image(img, tmp_path / f"vol{ext}")
    assert out == tmp_path / f"vol{ext}" and out.is_file()
    back = read_image(out, label=label)
    assert_same_geometry(img, back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    assert back.GetPixelID() == (sitk.sitkUInt8 if label else sitk.sitkFloat32)
    assert files_in(tmp_path) == {f"vol{ext}"}  # no temporary file left behind


def test_oblique_physical_points_survive_round_trip(tmp_path):
    img = make_image(direction=rotation(10, 25, -40), spacing=(1.1, 0.6, 3.0))
    for ext in (".nii.gz", ".nrrd", ".mha"):
        back = read_image(write_image(img, tmp_path / f"o{ext}"))
        for index in [(0, 0, 0), (7, 6, 5), (3, 2, 1)]:
            np.testing.assert_allclose(back.TransformIndexToPhysicalPoint(index),
                                       img.TransformIndexToPhysicalPoint(index), atol=1e-3)


def test_integer_images_are_read_as_float32_and_labels_as_unsigned(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    img = sitk.GetImageFromArray(arr)
    path = write_image(img, tmp_path / "int.nii.gz")
    back = read_image(path)
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr.astype(np.float32))
    lab = sitk.GetImageFromArray(np.array([[[0, 1], [2, 300]]], np.int32))
    back = read_image(write_image(lab, tmp_path / "lab.nrrd"), label=True)
    assert back.GetPixelID() == sitk.sitkUInt16
    with pytest.raises(FewShotSegError, match="negative"):
        read_image(path, label=True)
    frac = sitk.GetImageFromArray(np.full((2, 2, 2), 0.5, np.float32))
    with pytest.raises(FewShotSegError, match="fractional"):
        read_image(write_image(frac, tmp_path / "frac.nii.gz"), label=True)


def test_four_d_file_with_one_time_point_is_a_volume(tmp_path):
    arr = np.random.default_rng(1).random((1, 4, 5, 6)).astype(np.float32)
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=False), str(path))
    back = read_image(path)
    assert back.GetDimension() == 3 and back.GetSize() == (6, 5, 4)


# ----------------------------------------------------------------------------- DICOM + real data
def test_dicom_series_folder(totalseg_dir):
    ct = read_image(totalseg_dir / "ct_dicom")
    assert ct.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(ct.GetSpacing(), (0.977, 0.977, 2.0), atol=2e-3)
    arr = sitk.GetArrayViewFromImage(ct)
    assert arr.dtype == np.float32
    assert arr.min() <= -1000 and 1000 < arr.max() < 4000  # HU (rescale slope/intercept applied)


def test_one_dicom_file_reads_its_whole_series(totalseg_dir, tmp_path):
    files = sorted((totalseg_dir / "ct_dicom").iterdir())
    ct = read_image(files[3])
    assert ct.GetSize() == (512, 512, 20)
    whole = read_image(totalseg_dir / "ct_dicom")  # (array views need their image kept alive)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(whole))
    lone = tmp_path / "one.dcm"
    shutil.copy(files[0], lone)  # a file without the rest of its series: a 1-slice volume
    assert read_image(lone).GetSize() == (512, 512, 1)


def test_flipped_segmentation_aligns_with_dicom_in_physical_space(totalseg_dir):
    ct = read_image(totalseg_dir / "ct_dicom")
    seg_path = totalseg_dir / "ct_dicom_seg.nii.gz"
    raw_seg = read_image(seg_path, label=True)
    assert not same_grid(raw_seg, ct)  # flipped y, other origin: a real test of the resampling
    seg = read_mask_like(seg_path, ct)
    assert same_grid(seg, ct) and seg.GetPixelID() == sitk.sitkUInt8
    ct_arr, seg_arr = sitk.GetArrayViewFromImage(ct), sitk.GetArrayFromImage(seg)
    raw_arr = sitk.GetArrayViewFromImage(raw_seg)
    # same voxel centres up to the y flip: the resampled map is the stored one flipped
    np.testing.assert_array_equal(seg_arr, raw_arr[:, ::-1, :])
    # physical points carry the same label in both grids
    rng = np.random.default_rng(0)
    labelled = np.argwhere(seg_arr > 0)
    for k, j, i in labelled[rng.choice(len(labelled), 5, replace=False)]:
        point = ct.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        si, sj, sk = raw_seg.TransformPhysicalPointToIndex(point)
        assert raw_arr[sk, sj, si] == seg_arr[k, j, i]
    # the labels sit on the right tissue: HU medians (TotalSegmentator classes)
    def median_hu(value, labels):
        return float(np.median(ct_arr[labels == value]))
    assert 40 < median_hu(5, seg_arr) < 150          # liver: soft tissue
    assert 40 < median_hu(1, seg_arr) < 150          # spleen
    assert median_hu(32, seg_arr) > 150              # vertebra T12: bone
    assert -50 < median_hu(86, seg_arr) < 100        # autochthon (back muscle)
    # the body (> -500 HU) holds nearly every labelled voxel; without the flip it does not
    assert np.mean(ct_arr[seg_arr > 0] > -500) > 0.95
    assert np.mean(ct_arr[raw_arr > 0] > -500) < 0.85
    assert median_hu(86, raw_arr) < -500             # naive index overlay: the muscle lands in air


def test_chaos_image_and_label(chaos_dir):
    img = read_image(chaos_dir / "image_1.nii.gz")
    lab = read_image(chaos_dir / "label_1.nii.gz", label=True)
    assert img.GetSize() == lab.GetSize() and same_grid(img, lab)
    mask = read_mask_like(chaos_dir / "label_1.nii.gz", img)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(lab))
    assert set(np.unique(sitk.GetArrayViewFromImage(lab))) == {0, 1, 2, 3, 4}


def test_mask_on_coarser_grid_is_resampled(tmp_path):
    ref = make_image(shape=(10, 20, 20), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    arr = np.zeros((5, 10, 10), np.uint8)
    arr[2, 3:6, 4:7] = 2
    coarse = sitk.GetImageFromArray(arr)
    coarse.SetSpacing((2.0, 2.0, 2.0))
    coarse.SetOrigin((0.5, 0.5, 0.5))  # voxel centres of the coarse grid between fine voxels
    path = write_image(coarse, tmp_path / "coarse.nrrd")
    mask = sitk.GetArrayFromImage(read_mask_like(path, ref))
    assert mask.shape == (10, 20, 20) and set(np.unique(mask)) == {0, 2}
    # coarse voxels (k=2, j=3..5, i=4..6) cover fine voxels (z 4..5, y 6..11, x 8..13)
    assert np.count_nonzero(mask) == 3 * 3 * 8 and np.all(mask[4:6, 6:12, 8:14] == 2)
    # also accepts an image object
    assert np.array_equal(sitk.GetArrayFromImage(read_mask_like(coarse, ref)), mask)


# ----------------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path):
    with pytest.raises(FewShotSegError, match="not found") as info:
        read_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value) and "\n" not in str(info.value)


def test_corrupt_and_truncated_files(tmp_path, chaos_dir):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(FewShotSegError, match="cannot read"):
        read_image(junk)
    data = (chaos_dir / "image_1.nii.gz").read_bytes()
    for name, fraction in [("half.nii.gz", 0.5), ("almost.nii.gz", 0.999)]:
        (tmp_path / name).write_bytes(data[:int(len(data) * fraction)])
        with pytest.raises(FewShotSegError, match="truncated or corrupt"):
            read_image(tmp_path / name)
    plain = tmp_path / "plain.nii"
    plain.write_bytes(gzip.decompress(data)[:-1000])
    with pytest.raises(FewShotSegError, match="truncated or corrupt"):
        read_image(plain)
    img = make_image()
    nrrd = write_image(img, tmp_path / "x.nrrd")
    nrrd.write_bytes(nrrd.read_bytes()[:-50])
    with pytest.raises(FewShotSegError, match="cannot read"):
        read_image(nrrd)


def test_complete_gzip_with_several_members_is_accepted(tmp_path):
    """The cheap gzip-trailer check falls back to full decompression, not to an error."""
    img = make_image()
    path = write_image(img, tmp_path / "a.nii")
    raw = path.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(multi)), sitk.GetArrayFromImage(img))


def test_two_d_image_refused(tmp_path):
    path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(path))
    with pytest.raises(FewShotSegError, match="2D"):
        read_image(path)
    with pytest.raises(FewShotSegError, match=r"^label map .*flat.nii.gz is 2D"):   # named as what it is
        read_mask_like(path, sitk.Image(6, 5, 4, sitk.sitkFloat32))


def test_four_d_image_refused(tmp_path):
    path = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=False), str(path))
    with pytest.raises(FewShotSegError, match="4D"):
        read_image(path)


def test_vector_image_refused(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(FewShotSegError, match="3 values per voxel"):
        read_image(path)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nonfinite_voxels_refused(tmp_path, ext):
    """ITK turns NaN into 0 when it reads NIfTI: the file itself must be checked."""
    arr = np.ones((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    path = tmp_path / f"nan{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    with pytest.raises(FewShotSegError, match="contains 2 non-finite voxels"):
        read_image(path)
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.float64)), str(path))
    with pytest.raises(FewShotSegError, match="contains 2 non-finite voxels"):
        read_image(path)
    with pytest.raises(FewShotSegError, match=r"^label map .* contains 2 non-finite"):   # a painting
        read_image(path, label=True)


def test_truncated_float_nifti(tmp_path):
    path = tmp_path / "f.nii.gz"
    sitk.WriteImage(make_image(shape=(20, 30, 40)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(FewShotSegError, match="truncated or corrupt"):
        read_image(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FewShotSegError, match="no DICOM series"):
        read_image(tmp_path)


def test_output_equal_to_input_refused(tmp_path):
    img = make_image()
    src = write_image(img, tmp_path / "in.nii.gz")
    before = src.read_bytes()
    with pytest.raises(FewShotSegError, match="is also an input"):
        write_image(img, src, inputs=[src])
    # another spelling of the same path, and a symbolic link to it
    with pytest.raises(FewShotSegError, match="is also an input"):
        write_image(img, tmp_path / "sub" / ".." / "in.nii.gz", inputs=[str(src)])
    link = tmp_path / "link.nii.gz"
    os.symlink(src, link)
    with pytest.raises(FewShotSegError, match="is also an input"):
        write_image(img, link, inputs=[src])
    assert src.read_bytes() == before
    assert files_in(tmp_path) == {"in.nii.gz", "link.nii.gz"}


def test_failed_write_creates_nothing(tmp_path, monkeypatch):
    img = make_image()
    with pytest.raises(FewShotSegError, match="extensions"):
        write_image(img, tmp_path / "out.png")
    (tmp_path / "taken.nii.gz").mkdir()
    with pytest.raises(FewShotSegError, match="folder"):
        write_image(img, tmp_path / "taken.nii.gz")

    def broken_writer(image, filename, *args, **kwargs):  # writes half a file, then fails
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(imageio.sitk, "WriteImage", broken_writer)
    with pytest.raises(FewShotSegError, match="cannot write") as info:
        write_image(img, tmp_path / "new" / "deeper" / "c.nii.gz")
    assert "\n" not in str(info.value)
    assert files_in(tmp_path) == {"taken.nii.gz"}  # no temp file, no folder created
    # replacing an existing output that fails keeps the old file intact
    monkeypatch.undo()
    out = write_image(img, tmp_path / "keep.mha")
    before = out.read_bytes()
    monkeypatch.setattr(imageio.sitk, "WriteImage", broken_writer)
    with pytest.raises(FewShotSegError):
        write_image(make_image(seed=3), out)
    assert out.read_bytes() == before and files_in(tmp_path) == {"taken.nii.gz", "keep.mha"}


def test_write_creates_missing_folders_and_replaces_atomically(tmp_path):
    img = make_image()
    out = write_image(img, tmp_path / "a" / "b" / "m.nii.gz")
    assert out.is_file() and files_in(out.parent) == {"m.nii.gz"}
    img2 = make_image(seed=5)
    write_image(img2, out)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(out)), sitk.GetArrayFromImage(img2))
    assert files_in(out.parent) == {"m.nii.gz"}
    assert out.stat().st_mode & 0o777 == 0o666 & ~imageio._UMASK  # not mkstemp's 0600


def test_seg_nrrd_has_segment_metadata(tmp_path):
    arr = np.zeros((3, 4, 5), np.uint8)
    arr[1, 1:3, 1:3] = 4
    img = label_image_like(arr, make_image(shape=(3, 4, 5)))
    out = write_image(img, tmp_path / "s.seg.nrrd")
    text = out.read_bytes()[:2000].decode("latin-1")
    assert "Segment0_LabelValue:=4" in text


# ----------------------------------------------------------------------------- masks and labels
def test_select_label():
    arr = np.zeros((3, 4, 5), np.uint8)
    with pytest.raises(FewShotSegError, match="support mask is empty"):
        select_label(arr)
    arr[1, 1, 1] = 3
    np.testing.assert_array_equal(select_label(arr), arr == 3)
    np.testing.assert_array_equal(select_label(arr, 3), arr == 3)
    arr[2, 2, 2] = 7
    with pytest.raises(FewShotSegError, match=r"several labels \(3, 7\)"):
        select_label(arr)
    with pytest.raises(FewShotSegError, match=r"label 5 is not in the support mask \(labels present: 3, 7\)"):
        select_label(arr, 5)
    out = select_label(arr, 7)
    assert out.dtype == bool and out.sum() == 1 and out[2, 2, 2]
    assert select_label(arr.astype(bool)).sum() == 2
    with pytest.raises(FewShotSegError, match="not valid"):
        select_label(arr, 0)


def test_non_overlapping_mask_refused(tmp_path):
    ref = make_image(shape=(5, 6, 7), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    arr = np.zeros((5, 6, 7), np.uint8)
    arr[2, 2, 2] = 1
    far = sitk.GetImageFromArray(arr)
    far.SetOrigin((500.0, 0.0, 0.0))
    path = write_image(far, tmp_path / "far.nii.gz")
    with pytest.raises(FewShotSegError, match="does not overlap the image"):
        read_mask_like(path, ref)
    # an empty mask on another grid is returned as is (select_label reports it)
    empty = write_image(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.uint8)), tmp_path / "empty.nii.gz")
    resampled = read_mask_like(empty, ref)  # keep the image alive while its array view is used
    with pytest.raises(FewShotSegError, match="support mask is empty"):
        select_label(sitk.GetArrayViewFromImage(resampled))


def test_label_image_like():
    ref = make_image(shape=(3, 4, 5), direction=np.diag([1.0, -1.0, 1.0]))
    lab = label_image_like(np.ones((3, 4, 5), bool), ref)
    assert lab.GetPixelID() == sitk.sitkUInt8 and same_grid(lab, ref)
    with pytest.raises(FewShotSegError, match="differs from the image"):
        label_image_like(np.ones((3, 4, 6), np.uint8), ref)


# ----------------------------------------------------------------------------- anatomical axes
PERMUTED = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)  # i -> y, j -> z, k -> x


@pytest.mark.parametrize("direction, expected", [
    (np.eye(3), {"axial": 0, "coronal": 1, "sagittal": 2}),
    (np.diag([-1.0, -1.0, 1.0]), {"axial": 0, "coronal": 1, "sagittal": 2}),
    (np.diag([1.0, -1.0, -1.0]), {"axial": 0, "coronal": 1, "sagittal": 2}),
    # columns: index axis i along physical y, j along z, k along x -> array axes (k, j, i) = (x, z, y)
    (PERMUTED, {"axial": 1, "coronal": 2, "sagittal": 0}),
    (-PERMUTED, {"axial": 1, "coronal": 2, "sagittal": 0}),
    # sagittal acquisition: i = A-P, j = S-I (pointing down), k = L-R
    (np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float), {"axial": 1, "coronal": 2, "sagittal": 0}),
    # coronal acquisition: i = x, j = -z, k = y
    (np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float), {"axial": 1, "coronal": 0, "sagittal": 2}),
])
def test_array_axis_for(direction, expected):
    img = make_image(direction=direction)
    for name, axis in expected.items():
        assert array_axis_for(img, name) == axis
        assert array_axis_for(img, name.upper()) == axis


def test_array_axis_for_oblique_is_a_permutation():
    # 30 degrees about z: i and j both mostly in-plane; k stays S-I
    img = make_image(direction=rotation(0, 0, 30))
    assert array_axis_for(img, "axial") == 0
    assert array_axis_for(img, "sagittal") == 2 and array_axis_for(img, "coronal") == 1
    # 60 degrees about z: i is now closer to y, j closer to x
    img = make_image(direction=rotation(0, 0, 60))
    assert array_axis_for(img, "sagittal") == 1 and array_axis_for(img, "coronal") == 2
    img = make_image(direction=rotation(20, -35, 50))
    assert sorted(array_axis_for(img, a) for a in ("axial", "coronal", "sagittal")) == [0, 1, 2]


def test_array_axis_for_unknown_axis():
    with pytest.raises(FewShotSegError, match="unknown axis 'transversal'"):
        array_axis_for(make_image(), "transversal")


def test_real_files_axes(chaos_dir, totalseg_dir):
    # all stored axially: the slice axis is the first array axis
    for path in (chaos_dir / "image_1.nii.gz", totalseg_dir / "ct_small_3mm.nii.gz", totalseg_dir / "ct_dicom"):
        img = read_image(path)
        assert [array_axis_for(img, a) for a in ("axial", "coronal", "sagittal")] == [0, 1, 2]
