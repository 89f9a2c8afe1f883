"""A tqdm bar driven by the engine's (fraction, message) progress callback."""
from __future__ import annotations

import sys


def progress_bar(enabled: bool):
    """Returns (callback or None, close function)."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=100, unit="%", leave=False, file=sys.stderr)

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * fraction))
        bar.set_description(message, refresh=False)   # one redraw per update, below
        bar.refresh()

    return update, bar.close
