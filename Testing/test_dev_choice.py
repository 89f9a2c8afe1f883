"""The development-data rule in code (benchmarks/dev_choice.py): five sets, mean Dice over
1, 2, 3, 4 and 6 painted slices, adopt iff +0.005 on average and no set falls by > 0.002."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dev_choice  # noqa: E402


def _runs(folder: Path, name: str, shift: dict) -> None:
    """Three run files as interactive_benchmark.py writes them; ``shift``: set -> Dice added."""
    for plane in ("axial", "coronal", "sagittal"):
        structures = []
        for label, run_plane, dataset in dev_choice.SETS:
            if run_plane == plane:
                for k in range(3):
                    dice = [min(1.0, 0.7 + 0.04 * r + 0.01 * k + shift.get(label, 0.0)) for r in range(6)]
                    structures.append({"dataset": dataset, "method": "learned", "dice": dice})
        structures.append({"dataset": "chaos", "method": "fill", "dice": [0.0] * 6})   # another method: ignored
        (folder / f"{name}_{plane}.json").write_text(json.dumps({"structures": structures}))


def test_the_rule(tmp_path):
    _runs(tmp_path, "base", {})
    _runs(tmp_path, "good", {label: 0.006 for label, _, _ in dev_choice.SETS})
    _runs(tmp_path, "one_falls", {"CHAOS axial": -0.003, "CT axial": 0.02})
    _runs(tmp_path, "small", {"CT coronal": 0.01})
    base = dev_choice.set_means("base", tmp_path)
    assert base["CT sagittal"]["structures"] == 3 and base["CHAOS axial"]["mean_dice"]["1"] == 0.71
    adopt, mean, gains = dev_choice.verdict(base, dev_choice.set_means("good", tmp_path))
    assert adopt and abs(mean - 0.006) < 1e-9
    adopt, mean, gains = dev_choice.verdict(base, dev_choice.set_means("one_falls", tmp_path))
    assert not adopt and mean > 0.0025 and gains["CHAOS axial"] < -0.002
    adopt, mean, _ = dev_choice.verdict(base, dev_choice.set_means("small", tmp_path))
    assert not adopt and abs(mean - 0.002) < 1e-9


def test_record_appends_the_candidates(tmp_path, monkeypatch, capsys):
    _runs(tmp_path, "base", {})
    _runs(tmp_path, "cand", {"CT axial": 0.01})
    choices = tmp_path / "dev_choices.json"
    choices.write_text(json.dumps({"choices": []}))
    monkeypatch.setattr(dev_choice, "RUNS", tmp_path)
    monkeypatch.setattr(dev_choice, "CHOICES", choices)
    assert dev_choice.main(["record", "base", "cand", "--question", "Q", "--rule", "R", "--outcome", "O"]) == 0
    entry = json.loads(choices.read_text())["choices"][0]
    assert entry["question"] == "Q" and set(entry["candidates"]) == {"base", "cand"}
    assert "not adopted" in capsys.readouterr().out
