"""Shared pytest fixtures.

Real-scan tests read the shared data folder ``../shared/data`` (next to the repository
root) or ``$FEWSHOTSEG_DATA``; they skip with a clear message when it is absent.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SKIP_MESSAGE = "../shared/data not found: real-scan tests need the shared data folder (set FEWSHOTSEG_DATA)"


def shared_data_dir() -> Path | None:
    """The shared data folder, or None when it is not there."""
    env = os.environ.get("FEWSHOTSEG_DATA")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    return path.resolve() if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """pathlib.Path of the shared real-scan folder; skips the test when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip(SKIP_MESSAGE)
    return path


@pytest.fixture(scope="session")
def chaos_dir(shared_data) -> Path:
    path = shared_data / "chaos_t2"
    if not path.is_dir():
        pytest.skip(SKIP_MESSAGE)
    return path


@pytest.fixture(scope="session")
def totalseg_dir(shared_data) -> Path:
    path = shared_data / "totalseg"
    if not path.is_dir():
        pytest.skip(SKIP_MESSAGE)
    return path
