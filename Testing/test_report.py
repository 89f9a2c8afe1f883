"""benchmarks/report.py: docs/RESULTS.md is rendered from the result files."""
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


def test_results_page_shows_what_the_result_files_hold():
    """A result changed without `python benchmarks/report.py --write` leaves docs/RESULTS.md stale."""
    assert report.PAGE.read_text() == report.page(), "run: python benchmarks/report.py --write"


def test_every_table_of_the_results_page_has_rows():
    text = report.page()
    for heading in ("### Product benchmark", "### Speed and memory", "### Refinement", "### Few-shot protocol"):
        section = text.split(heading, 1)[1].split("\n### ", 1)[0]
        assert sum(line.startswith("| ") for line in section.splitlines()) >= 3, heading


def test_binarisation_table_puts_each_model_set_in_a_column(tmp_path):
    import json
    rules = {"fixed 0.5": {"what": "threshold 0.5", "mean": 73.03}, "otsu": {"what": "Otsu", "mean": 72.77}}
    for name, models, extra in (("a", ["crtpnet"], {}), ("b", ["crtpnet", "dfdt"], {"otsu": None})):
        body = {k: v for k, v in rules.items() if k not in extra}
        (tmp_path / f"binarisation_{name}.json").write_text(json.dumps(
            {"models": models, "folds": [0, 1], "hardware": "CPU x", "rules": body}))
    table = report.binarisation_table(sorted(tmp_path.glob("binarisation_*.json")))
    assert "| rule (EP1, setting 1, mean Dice %) | crtpnet (folds 0,1) | crtpnet + dfdt (folds 0,1) |" in table
    assert "| fixed 0.5: threshold 0.5 | 73.03 | 73.03 |" in table and "| otsu: Otsu | 72.77 | – |" in table
    assert report.binarisation_table([]) == ""
