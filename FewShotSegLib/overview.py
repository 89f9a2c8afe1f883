"""PNG overviews of support / label / prediction, the figure a user checks first."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"label": (60, 220, 60), "prediction": (230, 50, 50), "support": (60, 140, 255)}


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


def save_overview(path: Path, rows: list[tuple[str, list[tuple[str, np.ndarray]]]], tile: int = 192) -> Path:
    """``rows``: (title, [(caption, rgb_tile), ...]); tiles are shown flipped to radiological view."""
    ncols = max(len(r[1]) for r in rows)
    head = 16
    canvas = Image.new("RGB", (ncols * tile, len(rows) * (tile + head)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (title, tiles) in enumerate(rows):
        for c, (caption, rgb) in enumerate(tiles):
            img = Image.fromarray(np.ascontiguousarray(rgb)).resize((tile, tile), Image.NEAREST)
            canvas.paste(img, (c * tile, r * (tile + head) + head))
            draw.text((c * tile + 3, r * (tile + head) + 2), f"{title} {caption}", fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
