"""benchmarks/report.py: the README's "Measured" section is rendered from the result files."""
from __future__ import annotations

import pytest

from benchmarks import report


def test_on_cases_recomputes_the_summary_on_the_shared_cases():
    rows = [{"case": c, "organ": o, "dice": d, "seconds": 2.0}
            for c, d in (("1", 0.9), ("2", 0.5)) for o in report.ORGANS]
    subset = report.on_cases({"per_case": rows + [{"case": "1", "organ": "ct_liver", "dice": 0.0, "seconds": 9}]},
                             ["1"])
    assert subset["cases"] == 1 and subset["mean_dice"] == pytest.approx(0.9)
    assert subset["seconds_per_structure"] == pytest.approx(2.0)
    assert set(subset["dice_per_organ"]) == set(report.ORGANS)


def test_readme_shows_what_the_result_files_hold():
    """A result changed without `python benchmarks/report.py --write` leaves the README stale."""
    readme = (report.ROOT / "README.md").read_text()
    shown = readme.split(report.START, 1)[1].split(report.END, 1)[0]
    assert shown == "\n" + report.render(report.DEFAULT_CONFIG), "run: python benchmarks/report.py --write"
