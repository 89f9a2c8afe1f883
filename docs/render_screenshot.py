"""Render docs/screenshot.png (the Extension Manager's screenshot) from a real case.

Slicer itself cannot run on the build machine, so this draws what the module shows after
one click: each organ painted on its largest axial slice of CHAOS-T2 case 21 (one the
shipped step network never saw the labels of), propagated
with the shipped model and the product's defaults, overlaid as Slicer draws segments
(filled at 50 % opacity, outlined) in Slicer's axial and coronal orientation (patient's
right on the viewer's left, anterior / superior up).

    python docs/render_screenshot.py [--data ../shared/data] [--case 21]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from FewShotSegLib.checkpoints import load_for_mode  # noqa: E402
from FewShotSegLib.evaluation import CHAOS_ORGANS, largest_slice_support, shared_data_dir  # noqa: E402
from FewShotSegLib.imageio import read_image  # noqa: E402
from FewShotSegLib.propagation import PropagationOptions, propagate  # noqa: E402

# Slicer's colours for these structures (its GenericAnatomyColors table)
COLOURS = {"liver": (221, 130, 101), "right_kidney": (185, 102, 83), "left_kidney": (185, 102, 83),
           "spleen": (157, 108, 162)}


def _grey(plane: np.ndarray) -> np.ndarray:
    low, high = np.percentile(plane, [1, 99.5])
    return (255 * np.clip((plane - low) / max(high - low, 1e-6), 0, 1)).astype(np.uint8)


def _panel(plane: np.ndarray, masks: dict, aspect: float, width: int = 420) -> Image.Image:
    rgb = np.repeat(_grey(plane)[..., None], 3, axis=2).astype(np.float32)
    for organ, mask in masks.items():
        colour = np.array(COLOURS[organ], np.float32)
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * colour
        edge = mask & ~ndimage.binary_erosion(mask)
        rgb[edge] = colour
    image = Image.fromarray(rgb.astype(np.uint8))
    height = int(round(width * plane.shape[0] * aspect / plane.shape[1]))
    return image.resize((width, height), Image.NEAREST)


def render(data_dir: Path, out: Path, case: str = "21") -> Path:
    image = sitk.DICOMOrient(read_image(data_dir / "chaos_t2" / f"image_{case}.nii.gz"), "LPS")
    label = sitk.GetArrayFromImage(sitk.DICOMOrient(
        read_image(data_dir / "chaos_t2" / f"label_{case}.nii.gz", label=True), "LPS"))
    checkpoint = load_for_mode(None, "auto")
    volume = sitk.GetArrayFromImage(image).astype(np.float32)
    results, painted = {}, {}
    for organ, value in CHAOS_ORGANS.items():
        support, index = largest_slice_support(label == value, 0)
        results[organ] = propagate(image, support, checkpoint, PropagationOptions()).mask.astype(bool)
        painted[organ] = index
    union = np.any(list(results.values()), axis=0)
    k = int(np.argmax(union.sum((1, 2))))
    k = k + 2 if k + 2 not in painted.values() else k + 3          # a slice nobody painted
    sx, sy, sz = image.GetSpacing()
    # axial: rows = posterior (LPS y), so anterior is up; columns = patient's left: right on the viewer's left
    axial = _panel(volume[k], {o: m[k] for o, m in results.items()}, sy / sx)
    j = int(np.argmax(union.sum((0, 2))))
    coronal = _panel(volume[::-1, j, :], {o: m[::-1, j, :] for o, m in results.items()}, sz / sx)
    canvas = Image.new("RGB", (axial.width + coronal.width + 30, max(axial.height, coronal.height) + 60), "black")
    canvas.paste(axial, (10, 50))
    canvas.paste(coronal, (axial.width + 20, 50))
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 8), "FewShotSeg: each organ painted on one slice, propagated with one click "
                       "(CHAOS-T2 MRI, shipped model)", fill="white")
    draw.text((10, 28), f"axial slice {k} (not painted)", fill="white")
    draw.text((axial.width + 20, 28), "coronal reformat", fill="white")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--case", default="21")
    args = parser.parse_args(argv)
    print(render(shared_data_dir(args.data), Path(args.out), args.case))
    return 0


if __name__ == "__main__":
    sys.exit(main())
