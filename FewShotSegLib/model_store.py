"""Where checkpoints live and how a name on the command line becomes a file.

Offline first: the shipped models sit in the extension's ``Resources/Models``; users add
their own files to a per-user folder (``$FEWSHOTSEG_HOME`` or ``~/.fewshotseg/models``);
``$FEWSHOTSEG_MODELS`` may name more folders (os.pathsep-separated).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import FewShotSegError

DEFAULT_MODEL = "fewshotseg-default"
DEFAULT_REFINER = "fewshotseg-refiner"
DEFAULT_PROPAGATOR = "fewshotseg-propagator"   # the walk's step network (mode 'learned')
PACKAGE_ROOT = Path(__file__).resolve().parent


def user_model_dir() -> Path:
    home = os.environ.get("FEWSHOTSEG_HOME")
    return (Path(home) if home else Path.home() / ".fewshotseg") / "models"


def model_dirs() -> list[Path]:
    """Folders searched for checkpoints, first match wins."""
    dirs = [Path(p) for p in os.environ.get("FEWSHOTSEG_MODELS", "").split(os.pathsep) if p]
    dirs += [PACKAGE_ROOT.parent / "Resources" / "Models",   # source checkout / Slicer install
             PACKAGE_ROOT / "Resources" / "Models",          # copied beside the package
             user_model_dir()]
    seen, out = set(), []
    for d in dirs:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


@dataclass
class ModelEntry:
    name: str
    path: Path


def list_model_files() -> list[ModelEntry]:
    entries, names = [], set()
    for d in model_dirs():
        if d.is_dir():
            for f in sorted(d.glob("*.pt")):
                if f.stem not in names:
                    names.add(f.stem)
                    entries.append(ModelEntry(f.stem, f))
    return entries


def resolve_model_path(name_or_path: str | os.PathLike | None, default: str = DEFAULT_MODEL) -> Path:
    """A file path is used as is; a bare name is looked up in the model folders."""
    value = str(name_or_path) if name_or_path else default
    candidate = Path(value)
    if candidate.suffix == ".pt" or os.sep in value or candidate.exists():
        if not candidate.is_file():
            raise FewShotSegError(f"checkpoint not found: {candidate}")
        return candidate
    for entry in list_model_files():
        if entry.name == value:
            return entry.path
    known = ", ".join(e.name for e in list_model_files()) or "none installed"
    raise FewShotSegError(f"no model named '{value}' (available: {known}; or give a .pt file)")


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path, expected: str) -> None:
    """Downloaded or copied checkpoints are used only when their checksum matches."""
    actual = sha256_of(path)
    if actual.lower() != expected.lower():
        raise FewShotSegError(f"{path} has SHA-256 {actual[:12]}..., expected {expected[:12]}...: "
                              "the file is corrupt or not the published one")
