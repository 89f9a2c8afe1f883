"""PNG overviews of support / label / prediction, the figure a user checks first.

Slices are shown as a radiologist reads them (patient's right on the image's left; anterior
up in an axial slice, superior up in a coronal or sagittal one), whatever the scan's
direction cosines, so a figure never looks mirrored next to the same scan in 3D Slicer.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"label": (60, 220, 60), "prediction": (230, 50, 50), "support": (60, 140, 255)}
MEANINGS = {"support": "painted slice", "label": "manual label", "prediction": "propagated"}
MAX_PNG_BYTES = 300_000     # the size a committed figure must stay under (docs/DEVELOPMENT.md)

# Per world axis (LPS: x toward the patient's left, y posterior, z superior), the direction
# that runs down the rows and the one that runs across the columns in radiological view.
_VIEW = {2: ((1, +1), (0, +1)),      # axial: rows toward posterior (anterior up), columns toward left
         1: ((2, -1), (0, +1)),      # coronal: rows toward inferior, columns toward left
         0: ((2, -1), (1, +1))}      # sagittal: rows toward inferior, columns toward posterior
_LETTERS = {(0, +1): "L", (0, -1): "R", (1, +1): "P", (1, -1): "A", (2, +1): "S", (2, -1): "I"}


def _world_axes(image) -> list[tuple[int, int]]:
    """For each numpy axis of ``image``'s array (z, y, x): (nearest LPS axis, sign)."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    out = []
    for array_axis in range(3):
        column = d[:, 2 - array_axis]            # world direction of index axis 2 - array_axis
        world = int(np.argmax(np.abs(column)))
        out.append((world, 1 if column[world] > 0 else -1))
    return out


def radiological(slice2d: np.ndarray, image, axis_index: int) -> np.ndarray:
    """``slice2d`` (the array ``np.take(volume, i, axis_index)`` of ``image``) turned and
    flipped into radiological view."""
    axes = _world_axes(image)
    kept = [a for a in range(3) if a != axis_index]
    (row_world, row_sign), (col_world, col_sign) = _VIEW[axes[axis_index][0]]
    out = np.asarray(slice2d)
    if axes[kept[0]][0] == col_world:                 # array rows run across: transpose
        out, kept = out.T, kept[::-1]
    if axes[kept[0]][1] != row_sign:
        out = out[::-1]
    if axes[kept[1]][1] != col_sign:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def view_letters(image, axis_index: int) -> tuple[str, str, str, str]:
    """(top, bottom, left, right) patient directions of a `radiological` slice."""
    (row_world, row_sign), (col_world, col_sign) = _VIEW[_world_axes(image)[axis_index][0]]
    return (_LETTERS[(row_world, -row_sign)], _LETTERS[(row_world, row_sign)],
            _LETTERS[(col_world, -col_sign)], _LETTERS[(col_world, col_sign)])


def _grey(slice2d: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(slice2d, [1, 99])
    g = np.clip((slice2d - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m & ~inner


def overlay(slice2d: np.ndarray, masks: dict[str, np.ndarray]) -> np.ndarray:
    rgb = _grey(slice2d)
    for name, mask in masks.items():
        edge = _outline(mask)
        rgb[edge] = COLOURS.get(name, (255, 255, 0))
    return rgb


def save_png(image: Image.Image, path: Path) -> Path:
    """``image`` as a 256-colour PNG (a third of the bytes of RGB for these figures), so a
    committed figure stays small."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """A matplotlib figure through `save_png`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    return save_png(Image.open(buffer), path)


def save_overview(path: Path, rows: list[tuple[str, list[tuple[str, np.ndarray]]]], tile: int = 176,
                  letters: tuple[str, str, str, str] | None = None, title: str = "") -> Path:
    """``rows``: (title, [(caption, rgb_tile), ...]) with tiles already in radiological view;
    ``letters``: the patient directions at the tiles' top, bottom, left and right edges.
    A legend of the outline colours closes the figure."""
    ncols = max(len(r[1]) for r in rows)
    head, top, foot = 30, (18 if title else 0), 22
    canvas = Image.new("RGB", (ncols * tile, top + len(rows) * (tile + head) + foot), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((3, 3), title, fill=(255, 255, 255))
    for r, (row_title, tiles) in enumerate(rows):
        y = top + r * (tile + head)
        draw.text((3, y + 1), row_title, fill=(255, 255, 255))
        for c, (caption, rgb) in enumerate(tiles):
            x = c * tile
            canvas.paste(Image.fromarray(np.ascontiguousarray(rgb)).resize((tile, tile), Image.NEAREST), (x, y + head))
            draw.text((x + 3, y + 15), caption, fill=(200, 200, 200))
            if letters:
                t, b, left, right = letters
                mid = y + head + tile // 2
                draw.text((x + tile // 2 - 3, y + head + 2), t, fill=(255, 255, 0))
                draw.text((x + tile // 2 - 3, y + head + tile - 12), b, fill=(255, 255, 0))
                draw.text((x + 3, mid - 5), left, fill=(255, 255, 0))
                draw.text((x + tile - 10, mid - 5), right, fill=(255, 255, 0))
    x, y = 4, canvas.height - foot + 5
    for name, meaning in MEANINGS.items():
        draw.rectangle((x, y + 2, x + 10, y + 10), fill=COLOURS[name])
        draw.text((x + 14, y), meaning, fill=(255, 255, 255))
        x += 24 + 7 * len(meaning)
    return save_png(canvas, path)
