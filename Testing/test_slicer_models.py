"""The module's model list: offline first, local files validated, downloads checksummed.

Why: on an offline or proxied site the only way in is a local file, and a truncated or
wrong download must never become the model a clinician runs. Real checkpoints (small,
untrained) are written with FewShotSegLib.checkpoints; downloads use file:// URLs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "FewShotSeg"), str(ROOT)]

pytest.importorskip("torch")
pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.model_store import sha256_of  # noqa: E402
from FewShotSegSlicerLib.logic import FewShotSegLogic  # noqa: E402
from FewShotSegSlicerLib.models import ModelCatalog, formatCard, readCatalog  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from FewShotSegLib.checkpoints import save_checkpoint
    from FewShotSegLib.models import build_model
    from FewShotSegLib.preprocessing import PreprocessConfig

    path = tmp_path_factory.mktemp("src") / "my-liver-model.pt"
    save_checkpoint(path, build_model("alpnet", pretrained=False), preprocess=PreprocessConfig(size=64),
                    provenance={"created": "2026-01-01"},
                    card={"description": "untrained test model", "training_data": "none", "license": "Apache-2.0"})
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEWSHOTSEG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEWSHOTSEG_MODELS", raising=False)
    return tmp_path / "home" / "models"


def write_catalog(path: Path, *models) -> Path:
    path.write_text(json.dumps({"models": list(models)}))
    return path


def test_shipped_catalog_parses():
    entries = readCatalog()
    assert [e["name"] for e in entries] == ["fewshotseg-propagator", "fewshotseg-default"]   # the default first
    assert not any("url" in e for e in entries)
    assert ModelCatalog().defaultModelName() == "fewshotseg-propagator"


def test_add_checkpoint_validates_copies_and_shows_card(home, tmp_path, checkpoint):
    catalog = ModelCatalog(write_catalog(tmp_path / "Models.json"))
    info = catalog.addCheckpointFile(checkpoint)
    assert info.path == home / "my-liver-model.pt" and info.path.read_bytes() == checkpoint.read_bytes()
    listed = {m.name: m for m in catalog.models()}
    assert listed["my-liver-model"].available and listed["my-liver-model"].source == "user"
    card = catalog.cardText(listed["my-liver-model"])
    assert "untrained test model" in card and "Training data: none" in card and "alpnet" in card
    assert catalog.addCheckpointFile(checkpoint).path == info.path  # same file again: fine
    assert FewShotSegLogic(catalog).modelPath("my-liver-model") == info.path


def test_add_checkpoint_refuses_bad_files_and_name_clashes(home, tmp_path, checkpoint):
    catalog = ModelCatalog(write_catalog(tmp_path / "Models.json"))
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(checkpoint.read_bytes()[:2000])
    with pytest.raises(FewShotSegError, match="truncated.pt"):
        catalog.addCheckpointFile(bad)
    assert not home.exists() or not list(home.iterdir())
    catalog.addCheckpointFile(checkpoint)
    other = tmp_path / "other" / "my-liver-model.pt"
    other.parent.mkdir()
    other.write_bytes(checkpoint.read_bytes())
    with open(other, "ab") as fh:  # same name, different bytes
        fh.write(b"\0")
    with pytest.raises(FewShotSegError, match="already"):
        catalog.addCheckpointFile(other)


def test_download_is_sha256_verified(home, tmp_path, checkpoint):
    entry = {"name": "remote", "file": "remote.pt", "url": checkpoint.as_uri(),
             "sha256": sha256_of(checkpoint), "description": "downloadable"}
    catalog = ModelCatalog(write_catalog(tmp_path / "Models.json", entry))
    info = catalog.find("remote")
    assert not info.available and info.label == "remote (download)"
    with pytest.raises(FewShotSegError, match="not installed"):
        FewShotSegLogic(catalog).modelPath("remote")
    seen = []
    path = catalog.download(info, progress=lambda f, m: seen.append(f))
    assert path == home / "remote.pt" and sha256_of(path) == entry["sha256"] and seen
    assert catalog.find("remote").available


def test_download_with_wrong_checksum_leaves_nothing(home, tmp_path, checkpoint):
    entry = {"name": "remote", "file": "remote.pt", "url": checkpoint.as_uri(),
             "sha256": "0" * 64, "description": "tampered"}
    catalog = ModelCatalog(write_catalog(tmp_path / "Models.json", entry))
    with pytest.raises(FewShotSegError, match="SHA-256"):
        catalog.download(catalog.find("remote"))
    assert not home.exists() or not list(home.iterdir())


def test_download_failure_says_how_to_work_offline(home, tmp_path):
    entry = {"name": "remote", "file": "remote.pt", "url": (tmp_path / "absent.pt").as_uri(),
             "sha256": "0" * 64, "description": "unreachable"}
    catalog = ModelCatalog(write_catalog(tmp_path / "Models.json", entry))
    with pytest.raises(FewShotSegError, match="Add checkpoint"):
        catalog.download(catalog.find("remote"))


def test_shipped_file_with_wrong_checksum_is_refused(home, tmp_path, checkpoint, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "pinned.pt").write_bytes(checkpoint.read_bytes())
    monkeypatch.setenv("FEWSHOTSEG_MODELS", str(shipped))
    entry = {"name": "pinned", "file": "pinned.pt", "sha256": "f" * 64, "description": "shipped"}
    catalog = ModelCatalog(write_catalog(tmp_path / "Models.json", entry))
    info = catalog.find("pinned")
    assert info.available and info.source == "shipped"
    with pytest.raises(FewShotSegError, match="SHA-256"):
        catalog.resolvePath(info)
    entry["sha256"] = sha256_of(checkpoint)
    catalog = ModelCatalog(write_catalog(tmp_path / "Models.json", entry))
    assert catalog.resolvePath(catalog.find("pinned")) == shipped / "pinned.pt"


def test_broken_catalog_is_a_clear_error(tmp_path):
    path = tmp_path / "Models.json"
    path.write_text("{ not json")
    with pytest.raises(FewShotSegError, match="not valid JSON"):
        readCatalog(path)
    write_catalog(path, {"name": "x", "file": "x.pt", "url": "https://example.org/x.pt", "description": "d"})
    with pytest.raises(FewShotSegError, match="no sha256"):
        readCatalog(path)


def test_no_model_installed_is_a_clear_error(home, tmp_path):
    catalog = ModelCatalog(write_catalog(tmp_path / "Models.json"))
    if catalog.defaultModelName():
        pytest.skip("a model is installed in Resources/Models")
    with pytest.raises(FewShotSegError, match="no model is installed"):
        FewShotSegLogic(catalog).modelPath(None)


def test_format_card_lists_known_keys_first():
    text = formatCard({"license": "MIT", "description": "liver", "zeta": [1, 2]}, "m")
    lines = text.splitlines()
    assert lines[0] == "m" and lines[1] == "Description: liver" and lines[-1] == "Zeta: 1, 2"
    assert "no model card" in formatCard({}, "m")


def test_devices_always_include_cpu():
    devices = FewShotSegLogic().availableDevices()
    assert devices[0] == "cpu" and set(devices) <= {"cpu", "cuda", "mps"}


def test_shipped_refiner_is_not_offered_as_a_few_shot_model(home, tmp_path):
    from FewShotSegLib.model_store import DEFAULT_REFINER, list_model_files

    if DEFAULT_REFINER not in [e.name for e in list_model_files()]:
        pytest.skip("no shipped refiner in Resources/Models")
    assert DEFAULT_REFINER not in [m.name for m in ModelCatalog().models()]
    assert FewShotSegLogic().refinerPath().stem == DEFAULT_REFINER


def test_pytorch_that_cannot_be_downloaded_is_one_line_saying_how_to_install_it_offline(monkeypatch):
    """A hospital without internet: PyTorch's installer fails inside pip; the user gets what
    to do instead of pip's traceback. (PyTorchUtils is the PyTorch extension's module, not
    part of slicer-core: its installer is stood in for by one that fails as pip does.)"""
    import subprocess
    import types
    from FewShotSegSlicerLib import dependencies

    def install_torch(self, askConfirmation=False, torchVersionRequirement=None):
        raise subprocess.CalledProcessError(1, ["pip", "install", "light-the-torch>=0.5"])

    stand_in = types.ModuleType("PyTorchUtils")
    stand_in.PyTorchUtilsLogic = type("PyTorchUtilsLogic", (), {"torchInstalled": staticmethod(lambda: False),
                                                                  "installTorch": install_torch})
    monkeypatch.setitem(sys.modules, "PyTorchUtils", stand_in)
    monkeypatch.setattr(dependencies, "torchAvailable", lambda: False)
    with pytest.raises(FewShotSegError) as raised:
        dependencies.ensureEngineDependencies(askConfirmation=False)
    message = str(raised.value)
    assert "\n" not in message and "could not be downloaded" in message
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in message
    assert "pip download torch" in message and "--no-index" in message
