"""The repository as users and the Slicer index see it: the README's links, its length,
the engine's imports, the figures' sizes."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FIGURE_BYTES = 300_000


def local_links(markdown: Path) -> list[str]:
    """The link targets of ``markdown`` that are not web addresses or in-page anchors."""
    targets = [m.group(1) for m in LINK.finditer(markdown.read_text(encoding="utf-8"))]
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def unresolved(markdown: Path, root: Path = ROOT) -> list[str]:
    """Links of ``markdown`` that name no file inside ``root``."""
    missing = []
    for target in local_links(markdown):
        path = (markdown.parent / unquote(target.split("#", 1)[0])).resolve()
        if not path.is_file() or root.resolve() not in path.parents:
            missing.append(target)
    return missing


def test_every_readme_link_resolves_to_a_file_in_the_repository():
    assert local_links(README), "the README links nothing: the parser is broken"
    assert unresolved(README) == []


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_link_of_the_documentation_resolves(page):
    assert unresolved(page) == []


def test_link_check_finds_broken_and_outside_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "RESULTS.md").write_text("x")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[ok](RESULTS.md#a) [gone](nowhere.md) ![img](images/missing.png) [web](https://x.org) "
                    "[out](../../elsewhere.md) [anchor](#top)\n")
    (tmp_path.parent / "elsewhere.md").write_text("x")
    assert unresolved(page, tmp_path) == ["nowhere.md", "images/missing.png", "../../elsewhere.md"]


def test_readme_is_for_users_and_short():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    for setup in ('pip install torch==2.13.0 && pip install -e . && fewshotseg demo',
                  'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest Testing -q'):
        assert setup in text, setup
    assert "## Interactive use: correct and propagate again" in text
    assert "--axis auto" in text and "--exclude MASK" in text


def test_ci_runs_the_readme_test_command():
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest Testing -q' in \
        (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _imported_modules(package: Path) -> dict[str, set[str]]:
    out = {}
    for path in package.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[path.relative_to(ROOT).as_posix()] = names
    return out


def test_the_engine_imports_neither_training_nor_research_nor_slicer():
    forbidden = {"Training", "FewShotProtocol", "benchmarks", "slicer", "vtk", "qt", "ctk"}
    bad = {f: sorted(names & forbidden) for f, names in _imported_modules(ROOT / "FewShotSegLib").items()
           if names & forbidden}
    assert bad == {}


def test_the_protocol_research_code_is_not_in_the_engine():
    for name in ("protocol.py", "protocol_options.py", "protocol_report.py", "self_support.py",
                 "episode_predictors.py"):
        assert not (ROOT / "FewShotSegLib" / name).exists(), name


def test_committed_figures_are_under_300_kb():
    try:
        listed = subprocess.run(["git", "ls-files", "*.png"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the committed files are unknown")
    assert listed, "no committed figure found: the listing is broken"
    big = {name: (ROOT / name).stat().st_size for name in listed
           if (ROOT / name).is_file() and (ROOT / name).stat().st_size >= FIGURE_BYTES}
    assert big == {}
