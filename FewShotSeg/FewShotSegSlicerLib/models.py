"""Which checkpoints the user can pick: shipped, downloaded, added from a local file.

Offline first: the shipped default lives in the extension (``Resources/Models``) and
works without network; ``Resources/Models.json`` lists the published models with their
SHA-256; downloads and user-added files go to FewShotSegLib's per-user model folder
(``$FEWSHOTSEG_HOME`` or ``~/.fewshotseg/models``), which does not depend on the Slicer
version, so an upgrade keeps them. No torch import here except when a file is validated.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from FewShotSegLib import model_store
from FewShotSegLib.errors import FewShotSegError

MODULE_DIR = Path(__file__).resolve().parents[1]
CATALOG_FILE = MODULE_DIR / "Resources" / "Models.json"
CARD_KEYS = ("description", "intended_use", "training_data", "modalities", "metrics", "limitations",
             "license", "citation")


@dataclass
class ModelInfo:
    name: str
    description: str = ""
    path: Optional[Path] = None      # where the file is (or will be, once downloaded)
    url: Optional[str] = None
    sha256: Optional[str] = None
    source: str = "user"             # shipped | catalog | user

    @property
    def available(self) -> bool:
        return self.path is not None and self.path.is_file()

    @property
    def label(self) -> str:
        return self.name if self.available else f"{self.name} (download)"


def readCatalog(path: Path = CATALOG_FILE) -> list[dict]:
    """Entries of Models.json; a broken file is a clear error, not a silent empty list."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise FewShotSegError(f"{path} is not valid JSON: {exc}") from None
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise FewShotSegError(f"{path} has no 'models' list")
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("file"):
            raise FewShotSegError(f"{path}: every model needs a 'name' and a 'file'")
        if entry.get("url") and not entry.get("sha256"):
            raise FewShotSegError(f"{path}: model '{entry['name']}' has a url but no sha256")
    return entries


def formatCard(card: dict, name: str = "", provenance: Optional[dict] = None) -> str:
    """Plain-text model card for the panel: known keys first, then whatever else is there."""
    lines = [name] if name else []
    card = dict(card or {})
    for key in list(CARD_KEYS) + sorted(k for k in card if k not in CARD_KEYS):
        if key in card and card[key] not in (None, "", [], {}):
            value = card[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            lines.append(f"{key.replace('_', ' ').capitalize()}: {value}")
    if provenance and provenance.get("created"):
        lines.append(f"Created: {provenance['created']}")
    return "\n".join(lines) if len(lines) > 1 or not name else f"{name}\n(no model card in this checkpoint)"


class ModelCatalog:
    """Lists, validates, downloads and adds checkpoints."""

    def __init__(self, catalogFile: Path = CATALOG_FILE, userDir: Optional[Path] = None):
        self.catalogFile = Path(catalogFile)
        self._userDir = Path(userDir) if userDir else None
        self._cards: dict = {}
        self._verified: set = set()

    @property
    def userDir(self) -> Path:
        return self._userDir or model_store.user_model_dir()

    def models(self) -> list[ModelInfo]:
        """Catalog entries first (shipped or downloadable), then any other checkpoint found.
        The shipped refiner is not a few-shot model: Refine uses it, the model list leaves it out."""
        found = {e.name: e.path for e in model_store.list_model_files()}
        for f in sorted(self.userDir.glob("*.pt")) if self.userDir.is_dir() else []:
            found.setdefault(f.stem, f)
        found.pop(model_store.DEFAULT_REFINER, None)
        out, seen = [], set()
        for entry in readCatalog(self.catalogFile):
            name = entry["name"]
            stem = Path(entry["file"]).stem
            path = found.get(stem) or found.get(name)
            source = "shipped" if path is not None and not entry.get("url") else "catalog"
            if path is None and entry.get("url"):
                path = self.userDir / Path(entry["file"]).name
            out.append(ModelInfo(name, entry.get("description", ""), path, entry.get("url"),
                                 entry.get("sha256"), source))
            seen.update({name, stem})
        for name, path in found.items():
            if name not in seen:
                out.append(ModelInfo(name, "", path, source="user"))
        return out

    def find(self, name: str) -> ModelInfo:
        for info in self.models():
            if info.name == name:
                return info
        raise FewShotSegError(f"no model named '{name}' (available: "
                              f"{', '.join(m.name for m in self.models()) or 'none'})")

    def defaultModelName(self) -> str:
        models = [m for m in self.models() if m.available]
        names = [m.name for m in models]
        for preferred in (model_store.DEFAULT_PROPAGATOR, model_store.DEFAULT_MODEL):
            if preferred in names:
                return preferred
        return names[0] if names else ""

    def resolvePath(self, info: ModelInfo) -> Path:
        """The file to load; a shipped file with a published checksum is verified once."""
        if not info.available:
            hint = "download it first" if info.url else "add the checkpoint file"
            raise FewShotSegError(f"model '{info.name}' is not installed: {hint}")
        key = (str(info.path), info.path.stat().st_mtime_ns)
        if info.sha256 and key not in self._verified:
            model_store.verify_sha256(info.path, info.sha256)
            self._verified.add(key)
        return info.path

    def card(self, path: Path) -> dict:
        """Card + identity of a checkpoint without building the model (cached per file version)."""
        path = Path(path)
        key = (str(path), path.stat().st_mtime_ns if path.exists() else 0)
        if key not in self._cards:
            from FewShotSegLib.checkpoints import read_checkpoint_dict

            payload = read_checkpoint_dict(path)
            self._cards[key] = {"name": payload["model_name"], "card": payload.get("card", {}),
                                "provenance": payload.get("provenance", {})}
        return self._cards[key]

    def cardText(self, info: ModelInfo) -> str:
        if not info.available:
            return f"{info.name}\n{info.description}\nNot installed yet (download {info.url})."
        try:
            meta = self.card(info.path)
        except ImportError:  # reading a checkpoint needs PyTorch, installed on first propagation
            return f"{info.name}\n{info.description}\n(The model card is shown once PyTorch is installed.)"
        card = dict(meta["card"])
        card.setdefault("description", info.description)
        return formatCard(card, f"{info.name} ({meta['name']})", meta["provenance"])

    def addCheckpointFile(self, path, name: Optional[str] = None) -> ModelInfo:
        """Validate a local checkpoint (it must load), then copy it into the user folder."""
        from FewShotSegLib.checkpoints import PROPAGATION_KINDS, load_checkpoint

        source = Path(path)
        loaded = load_checkpoint(source, expect_kind=PROPAGATION_KINDS)  # raises FewShotSegError naming the file
        name = name or source.stem
        target = self.userDir / f"{name}.pt"
        if target.exists():
            if model_store.sha256_of(target) == model_store.sha256_of(source):
                return ModelInfo(name, loaded.card.get("description", ""), target, source="user")
            raise FewShotSegError(f"a different model named '{name}' is already installed ({target}); "
                                  "rename the file")
        if any(m.name == name for m in self.models()):
            raise FewShotSegError(f"a model named '{name}' already exists; rename the file")
        self._copyAtomic(source, target)
        return ModelInfo(name, loaded.card.get("description", ""), target, source="user")

    def download(self, info: ModelInfo, progress: Optional[Callable[[float, str], None]] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> Path:
        """Fetch a catalog model into the user folder; kept only if its SHA-256 matches."""
        if not info.url or not info.sha256:
            raise FewShotSegError(f"model '{info.name}' has no download address and checksum")
        target = info.path or self.userDir / f"{info.name}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(info.url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while chunk := response.read(1 << 20):
                    if cancel and cancel():
                        raise FewShotSegError(f"download of '{info.name}' cancelled")
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done / total if total else 0.0, f"{done >> 20} MB of {info.name}")
            model_store.verify_sha256(tmp, info.sha256)
            os.replace(tmp, target)
        except OSError as exc:
            raise FewShotSegError(f"could not download '{info.name}' from {info.url}: {exc}; "
                                  "on an offline computer add the file with 'Add checkpoint'") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    @staticmethod
    def _copyAtomic(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
