"""The protocol's ensemble option (row ``<model>+ens``, ``--ensemble-with``): members of
different architectures averaged, and the one-command run pairing each fold model with the
same fold's model of another run, with its errors."""
from __future__ import annotations

import json

import pytest
import torch

from FewShotProtocol import protocol as P
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.models import build_model
from FewShotSegLib.preprocessing import PreprocessConfig

from test_protocol import run_protocol


def test_ensemble_averages_members_of_different_architectures():
    torch.manual_seed(0)
    members = [P.ModelPredictor(build_model(name, backbone="effnet-lite0", pretrained=False), PreprocessConfig(size=64))
               for name in ("alpnet", "crtpnet")]
    images = torch.rand(3, 64, 64)
    mask = torch.zeros(64, 64)
    mask[20:40, 20:40] = 1

    def run(predictor):
        feats = predictor.prepare(images)
        return predictor.predict(feats[0], mask, feats[[1, 2]])

    both = run(P.EnsemblePredictor(members))
    assert torch.allclose(both, (run(members[0]) + run(members[1])) / 2, atol=1e-6)
    wrapped = run(P.MultiScalePredictor(P.EnsemblePredictor(members), (1.0, 1.5)))
    assert wrapped.shape == (2, 64, 64)
    with pytest.raises(FewShotSegError, match="one pre-processing"):
        P.EnsemblePredictor([members[0], P.ModelPredictor(members[1].model, PreprocessConfig(size=32))])
    assert P.test_time_option("blend+ens").ensemble and not P.test_time_option("blend").ensemble


def test_ensemble_row_pairs_the_same_fold_and_setting_and_fails_clearly(chaos_dir, tmp_path, capsys):
    """A model ensembled with itself scores exactly as alone; the row names its partner,
    keeps its key, and a missing partner or option is one clear line."""
    assert run_protocol(tmp_path, "--models", "crtpnet", "--settings", "1", "--steps", "1") == 0
    partner = tmp_path / "work" / "crtpnet"
    capsys.readouterr()
    assert run_protocol(tmp_path, "--models", "crtpnet", "--settings", "1", "--steps", "1",
                        "--test-time", "ens") == 2
    assert "ens needs --ensemble-with" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_protocol(tmp_path, "--models", "alpnet", "--settings", "1", "--steps", "1",
                        "--test-time", "ens", "--ensemble-with", str(empty)) == 2
    err = capsys.readouterr().err
    assert "+ens: no fold model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "work" / "alpnet").exists()              # refused before any training
    folder = tmp_path / "results" / "protocol" / "t"
    assert not (folder / "crtpnet+ens").exists()                    # nothing half-written
    assert run_protocol(tmp_path, "--models", "crtpnet", "--settings", "1", "--steps", "1",
                        "--test-time", "ens", "--ensemble-with", str(partner)) == 0
    alone = json.loads((folder / "crtpnet" / "fold_0_s1.json").read_text())
    paired = json.loads((folder / "crtpnet+ens" / "fold_0_s1.json").read_text())
    assert [r["ep1"]["dice"] for r in paired["rows"]] == pytest.approx([r["ep1"]["dice"] for r in alone["rows"]])
    assert len(paired["checkpoints"]) == 2 and paired["checkpoints"][1]["ensemble"]
    assert paired["compliant"] and any("ensemble partner" in n for n in paired["notes"])
    assert paired["key"]["ensemble_with"] == str(partner.resolve()) and "ensemble_with" not in alone["key"]
    # several folders: one partner each; the same row with other partners is refused, kept as it was
    two = f"{partner},{partner}"
    assert run_protocol(tmp_path, "--models", "crtpnet", "--settings", "1", "--steps", "1",
                        "--test-time", "ens", "--ensemble-with", two) == 2
    assert "use another --run-name" in capsys.readouterr().err
    assert json.loads((folder / "crtpnet+ens" / "fold_0_s1.json").read_text()) == paired
    assert run_protocol(tmp_path, "--models", "crtpnet", "--settings", "1", "--steps", "1",
                        "--test-time", "ens", "--ensemble-with", two, "--run-name", "t3") == 0
    three = json.loads((tmp_path / "results" / "protocol" / "t3" / "crtpnet+ens" / "fold_0_s1.json").read_text())
    assert [r["ep1"]["dice"] for r in three["rows"]] == pytest.approx([r["ep1"]["dice"] for r in alone["rows"]])
    assert len(three["checkpoints"]) == 3 and sum("ensemble partner" in n for n in three["notes"]) == 2
