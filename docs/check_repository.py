"""Check what the Slicer ExtensionsIndex checks of a repository, offline, on a fresh clone.

The index's own validator (``check_description_files.py`` in Slicer/ExtensionsIndex)
needs the network for its URL checks; this script does the offline part that matters to
this repository: a full clone (history included) stays under the 100 MB limit, a LICENSE
is at the root, the catalog entry uses only the schema's keys; and the repository's own
rule that a committed figure is under 300 KB.

    python docs/check_repository.py [--branch NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 100 * 1000 * 1000          # the index's limit, 100 MB
FIGURE_BYTES = 300_000
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "build_subdirectory", "enabled", "tier"}   # Slicer's catalog-entry schema v1.0.1


def folder_bytes(folder: Path) -> int:
    return sum((Path(d) / f).stat().st_size for d, _, files in os.walk(folder) for f in files
               if not (Path(d) / f).is_symlink())


def check(branch: str | None) -> list[str]:
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        command = ["git", "clone", "--quiet", "--no-local"] + (["--branch", branch] if branch else [])
        subprocess.run(command + [str(ROOT), str(clone)], check=True)
        total, history = folder_bytes(clone), folder_bytes(clone / ".git")
        print(f"fresh clone: {total / 1e6:.1f} MB (history {history / 1e6:.1f} MB, files {(total - history) / 1e6:.1f} MB); "
              f"limit {LIMIT_BYTES / 1e6:.0f} MB")
        if total >= LIMIT_BYTES:
            problems.append(f"the clone is {total / 1e6:.1f} MB, over the index's {LIMIT_BYTES / 1e6:.0f} MB")
        if not (clone / "LICENSE").is_file():
            problems.append("no LICENSE at the repository's root")
        entry = json.loads((clone / "FewShotSeg.json").read_text(encoding="utf-8"))
        if set(entry) - CATALOG_KEYS:
            problems.append(f"catalog entry keys not in the schema: {sorted(set(entry) - CATALOG_KEYS)}")
        big = [p.relative_to(clone).as_posix() for p in clone.rglob("*.png")
               if ".git" not in p.parts and p.stat().st_size >= FIGURE_BYTES]
        problems += [f"figure over {FIGURE_BYTES // 1000} KB: {name}" for name in big]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branch", default=None, help="branch to clone (default: the checked-out one)")
    args = parser.parse_args(argv)
    problems = check(args.branch)
    for line in problems:
        print(f"check_repository: {line}", file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
