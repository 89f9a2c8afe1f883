"""Provenance of a trained checkpoint: which data, which code, which machine.

Recorded in every release checkpoint so a model card can say exactly how it was made.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def display_path(path: Path) -> str:
    """Paths in the provenance as in the configs (relative to the repository when near it)."""
    try:
        rel = os.path.relpath(path, ROOT)
    except ValueError:
        return str(path)
    return rel if rel.count("..") <= 1 else str(path)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_commit() -> str:
    """HEAD's hash; '+local-changes' when the engine or training code differs from it."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        commit = run("rev-parse", "HEAD") or "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "FewShotSegLib", "Training")
        return commit + ("+local-changes" if dirty and commit != "unknown" else "")
    except Exception:
        return "unknown"


def hardware(device: torch.device, world: int, threads: int | None = None) -> str:
    """'8 x NVIDIA H100 ...' or the CPU model, cores, processes and threads."""
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({cores()} cores), {world} process(es) x {threads or torch.get_num_threads()} threads"
