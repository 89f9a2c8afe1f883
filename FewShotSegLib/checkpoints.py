"""One checkpoint file per model: weights, how to rebuild it, how to feed it, where it came from.

A checkpoint is a plain dict of tensors and Python containers so that it loads with
``torch.load(weights_only=True)`` (no pickled code can run). It is validated before the
weights touch a model, and every failure names the file.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .errors import FewShotSegError
from .preprocessing import PreprocessConfig

FORMAT = "fewshotseg-checkpoint"
FORMAT_VERSION = 1
KINDS = ("fewshot", "refiner", "propagator")   # propagator: the walk's step network
_REQUIRED = ("format", "format_version", "kind", "model_name", "model_config",
             "preprocess", "state_dict", "provenance")


@dataclass
class LoadedCheckpoint:
    """A ready-to-run model and everything recorded with it."""

    model: torch.nn.Module
    name: str
    kind: str
    config: dict
    preprocess: PreprocessConfig
    provenance: dict
    card: dict
    path: Path
    extra: dict = field(default_factory=dict)


def atomic_write(path, write: Callable[[BinaryIO], None], shared: bool = False) -> Path:
    """``write(file)`` into a temporary file beside ``path``, then rename: never a
    half-written file. ``shared``: the umask's usual mode instead of mkstemp's 0600 (a cache
    that other users or DDP ranks read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if shared:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path, model: torch.nn.Module, *, kind: str = "fewshot",
                    preprocess: PreprocessConfig, provenance: dict,
                    card: dict | None = None, half: bool = True,
                    extra: dict | None = None) -> Path:
    """Save a release checkpoint; floating weights in float16 by default (halves the size)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    path = Path(path)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value.contiguous()
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model_name": model.name,
        "model_config": dict(model.config),
        "preprocess": preprocess.to_dict(),
        "state_dict": state,
        "provenance": dict(provenance),
        "card": dict(card or {}),
        "extra": dict(extra or {}),
    }
    _atomic_torch_save(payload, path)
    return path


def read_checkpoint_dict(path) -> dict:
    """Load and validate the raw dict (no model built): for `fewshotseg models` and checks."""
    path = Path(path)
    if not path.is_file():
        raise FewShotSegError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a legacy pickle before it fails: our line says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, pickled code...
        raise FewShotSegError(f"{path} is not a readable FewShotSeg checkpoint "
                              f"(corrupt, truncated or unsafe): {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FewShotSegError(f"{path} is not a FewShotSeg checkpoint")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise FewShotSegError(f"{path} is an incomplete checkpoint (missing {', '.join(missing)})")
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FewShotSegError(f"{path} has checkpoint format {version}, newer than this "
                              f"FewShotSeg supports ({FORMAT_VERSION}); update FewShotSeg")
    if payload["kind"] not in KINDS:
        raise FewShotSegError(f"{path} holds an unknown kind of model '{payload['kind']}'")
    return payload


def _build_for(payload: dict, path: Path) -> torch.nn.Module:
    name, kind = payload["model_name"], payload["kind"]
    if kind in ("fewshot", "propagator"):
        from .models import available_models, build_model
    else:
        from .refinement import available_refiners as available_models, build_refiner as build_model
    if name not in available_models():
        raise FewShotSegError(f"{path} holds model '{name}', which this FewShotSeg does not know "
                              f"(known: {', '.join(available_models())})")
    config = dict(payload["model_config"])
    config["pretrained"] = False  # the checkpoint's weights replace any initialisation
    return build_model(name, **config)


KIND_NAMES = {"fewshot": "a few-shot model", "refiner": "a refiner", "propagator": "a propagator (step network)"}
PROPAGATION_KINDS = ("fewshot", "propagator")   # what a propagation can run on


def load_checkpoint(path, *, expect_kind="fewshot", device: str = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from a validated checkpoint, in eval mode, float32 on ``device``.
    ``expect_kind``: one kind or a tuple of kinds accepted here."""
    path = Path(path)
    payload = read_checkpoint_dict(path)
    accepted = (expect_kind,) if isinstance(expect_kind, str) else tuple(expect_kind)
    if payload["kind"] not in accepted:
        wanted = " or ".join(KIND_NAMES[k] for k in accepted)
        raise FewShotSegError(f"{path} holds {KIND_NAMES.get(payload['kind'], payload['kind'])} "
                              f"('{payload['model_name']}'), but {wanted} is needed here")
    model = _build_for(payload, path)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in payload["state_dict"].items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FewShotSegError(
            f"{path} does not match model '{payload['model_name']}' "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected weights)")
    model.to(device).eval()
    try:
        preprocess = PreprocessConfig.from_dict(payload["preprocess"])
    except Exception as exc:
        raise FewShotSegError(f"{path} has invalid pre-processing settings: {exc}") from None
    return LoadedCheckpoint(model=model, name=payload["model_name"], kind=payload["kind"],
                            config=dict(payload["model_config"]), preprocess=preprocess,
                            provenance=dict(payload["provenance"]), card=dict(payload.get("card", {})),
                            path=path, extra=dict(payload.get("extra", {})))


def load_for_mode(name_or_path, mode: str, device: str = "cpu"):
    """The checkpoint a propagation in ``mode`` runs on: the shipped step network for
    'learned' and 'auto', the shipped few-shot model for 'chained' and 'direct', none for
    'registration'. A name or file given must be of the mode's kind ('auto': either), so
    a wrong file is one line naming it, before any work."""
    from .model_store import DEFAULT_MODEL, DEFAULT_PROPAGATOR, resolve_model_path
    if mode == "registration":
        return None
    default = DEFAULT_PROPAGATOR if mode in ("learned", "auto") else DEFAULT_MODEL
    kinds = {"auto": PROPAGATION_KINDS, "learned": "propagator"}.get(mode, "fewshot")
    return load_checkpoint(resolve_model_path(name_or_path, default=default), expect_kind=kinds, device=device)


def save_training_state(path, state: dict) -> Path:
    """Everything --resume needs (model, optimiser, scheduler, scaler, step, RNG), atomically."""
    path = Path(path)
    _atomic_torch_save(state, path)
    return path


def load_training_state(path) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FewShotSegError(f"training state not found: {path}") from None
    except Exception as exc:
        raise FewShotSegError(f"{path} is not a readable training state: {type(exc).__name__}") from None


def publish_checkpoint(source, destination, card_updates: dict) -> Path:
    """Copy a validated checkpoint to ``destination`` with its model card completed
    (measured results, wall time...), so the shipped file carries its own card."""
    payload = read_checkpoint_dict(source)
    payload["card"] = {**payload.get("card", {}), **card_updates}
    destination = Path(destination)
    _atomic_torch_save(payload, destination)
    return destination
