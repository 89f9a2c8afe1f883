"""Where to look next: the fitted ranking (suggestions.py, fitted.py, Training/fit_suggest.py)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.fitted import fit_ridge
from FewShotSegLib.model_store import DEFAULT_PROPAGATOR, list_model_files
from FewShotSegLib.propagation import PropagationOptions, propagate
from FewShotSegLib.suggestions import SUGGEST_FEATURES, load_suggestion_model, slice_feature_vector

SHIPPED = DEFAULT_PROPAGATOR in {e.name for e in list_model_files()}
needs_stepper = pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")


def test_ridge_recovers_a_linear_target():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, len(SUGGEST_FEATURES)))
    y = 2.0 * x[:, 0] - x[:, 3] + 0.5 + rng.normal(0, 0.01, 300)
    model = fit_ridge(x, y, SUGGEST_FEATURES, l2=1e-6)
    assert abs(model.predict(x[0]) - y[0]) < 0.05


def test_the_shipped_ranking_loads_and_reads_its_features():
    model = load_suggestion_model()
    assert model is not None, "Resources/Models/fewshotseg-propagator.suggest.json is missing"
    assert model.weights.shape == (len(SUGGEST_FEATURES),) and model.info["structures"] > 10
    near = slice_feature_vector({"network_vs_registration": 200.0, "area": 3000.0}, 1)
    far = slice_feature_vector({"network_vs_registration": 200.0, "area": 3000.0}, 8)
    assert model.predict(far) > model.predict(near)      # errors grow away from the painting


def test_unknown_ranking_is_refused():
    with pytest.raises(FewShotSegError, match="unknown suggestion ranking"):
        PropagationOptions(suggest="random").validate()


@needs_stepper
def test_correcting_the_first_suggestion_helps(chaos_dir):
    """CHAOS case 10 (not fitted on), each organ painted on its largest slice, then the user
    corrects the slice the tool suggests first (paints it, or marks it absent): the mean
    Dice rises, at least as much as with the heuristic parts' sum."""
    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.metrics import dice

    image = sitk.ReadImage(str(chaos_dir / "image_10.nii.gz"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(chaos_dir / "label_10.nii.gz")))
    stepper = load_for_mode(None, "learned")
    gains = {"fitted": [], "parts": []}
    for organ in (1, 2, 3, 4):
        truth = label == organ
        z = int(np.argmax(truth.sum((1, 2))))
        support = np.zeros_like(truth)
        support[z] = truth[z]
        for ranking in gains:
            options = PropagationOptions(mode="learned", suggest=ranking)
            first = propagate(image, support, stepper, options)
            assert first.suggestions and set(first.slice_features) >= {s.slice for s in first.suggestions}
            pick = first.suggestions[0].slice
            corrected, exclude = support.copy(), None
            if truth[pick].any():
                corrected[pick] = truth[pick]
            else:
                exclude = np.zeros_like(truth)
                exclude[pick] = True
            again = propagate(image, corrected, stepper, options, exclude=exclude)
            gains[ranking].append(dice(again.mask > 0, truth) - dice(first.mask > 0, truth))
    assert np.mean(gains["fitted"]) > 0.01
    assert np.mean(gains["fitted"]) >= np.mean(gains["parts"]) - 0.005


@needs_stepper
def test_fit_suggest_writes_a_ranking_and_refuses_no_data(chaos_dir, tmp_path, capsys):
    from Training import fit_suggest

    out = tmp_path / "suggest.json"
    assert fit_suggest.cli(["--out", str(out), "--chaos", "1", "--ct-per-scan", "0", "--rounds", "2"]) == 0
    assert load_suggestion_model(out).info["slices"] > 20
    empty = tmp_path / "empty.json"
    assert fit_suggest.cli(["--out", str(empty), "--chaos", "", "--ct-per-scan", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and not empty.exists()


def test_auto_ranking_is_fitted_only_where_it_was_chosen(monkeypatch):
    """'auto': the fitted ranking in learned and chained modes; registration mode keeps the
    parts' sum (the fitted one lost there on development data)."""
    calls = []
    monkeypatch.setattr("FewShotSegLib.propagation.load_suggestion_model", lambda **_: calls.append(1))
    array = np.random.default_rng(0).normal(0.2, 0.05, (12, 48, 48)).astype(np.float32)
    array[2:10, 14:34, 14:34] += 1.0
    support = np.zeros(array.shape, bool)
    support[6, 14:34, 14:34] = True
    image = sitk.GetImageFromArray(array)
    propagate(image, support, None, PropagationOptions(mode="registration"))
    assert calls == []
    propagate(image, support, None, PropagationOptions(mode="registration", suggest="fitted"))
    assert calls == [1]


def test_a_damaged_ranking_costs_a_warning_not_the_result(tmp_path, monkeypatch):
    from FewShotSegLib.fitted import load_fitted
    bad = tmp_path / "fewshotseg-propagator.suggest.json"
    bad.write_text("{damaged")
    monkeypatch.setattr("FewShotSegLib.propagation.load_suggestion_model", lambda **_: load_fitted(bad, SUGGEST_FEATURES))
    array = np.random.default_rng(0).normal(0.2, 0.05, (12, 48, 48)).astype(np.float32)
    array[2:10, 14:34, 14:34] += 1.0
    support = np.zeros(array.shape, bool)
    support[6, 14:34, 14:34] = True
    result = propagate(sitk.GetImageFromArray(array), support, None,
                       PropagationOptions(mode="registration", suggest="fitted"))
    assert result.mask[2:10].any()
    assert any("unreadable" in w and "plain sum" in w for w in result.warnings)


def test_a_ranking_beside_a_checkpoint_is_that_networks(tmp_path):
    """``stepper.suggest.json`` beside ``stepper.pt`` ranks for that network; a network
    without one gets the shipped ranking."""
    import json
    rng = np.random.default_rng(1)
    own = fit_ridge(rng.normal(size=(50, len(SUGGEST_FEATURES))), rng.normal(size=50), SUGGEST_FEATURES)
    (tmp_path / "stepper.pt").write_bytes(b"")
    (tmp_path / "stepper.suggest.json").write_text(json.dumps(own.to_dict()))
    assert load_suggestion_model(beside=tmp_path / "stepper.pt").bias == pytest.approx(own.bias)
    (tmp_path / "other.pt").write_bytes(b"")
    assert load_suggestion_model(beside=tmp_path / "other.pt").bias == pytest.approx(load_suggestion_model().bias)
