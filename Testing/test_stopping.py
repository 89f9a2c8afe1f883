"""Where walks end: the fitted stop model (stopping.py), its fitting (Training/fit_stop.py)
and the stop option of the engine and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.model_store import DEFAULT_PROPAGATOR, list_model_files
from FewShotSegLib.propagation import PropagationOptions, PropagationSession, propagate
from FewShotSegLib.stopping import FEATURES, StopModel, fit_stop_model, load_stop_model, step_features, stop_model_path

SHIPPED = DEFAULT_PROPAGATOR in {e.name for e in list_model_files()}
needs_stepper = pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")


def _separable(n: int = 400, seed: int = 0):
    """Wrong steps: low intensity agreement and a growing area."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < 0.25
    x = rng.normal(0, 0.3, (n, len(FEATURES)))
    x[:, 0] += np.where(wrong, 0.3, 0.9)
    x[:, 2] += np.where(wrong, 0.4, -0.1)
    return x, wrong.astype(float)


def test_fit_separates_and_round_trips(tmp_path):
    x, y = _separable()
    model = fit_stop_model(x, y, info={"what": "synthetic"})
    p = np.array([model.probability(f) for f in x])
    assert ((p >= 0.5) == (y > 0.5)).mean() > 0.9
    assert model.weights[0] < 0 < model.weights[2]       # less agreement, more growth: wrong
    path = tmp_path / "stop.json"
    path.write_text(json.dumps(model.to_dict()))
    again = load_stop_model(path)
    assert np.allclose([again.probability(f) for f in x[:20]], p[:20])


def test_fit_on_a_subset_leaves_other_weights_at_zero():
    x, y = _separable()
    model = fit_stop_model(x, y, use=["agreement", "log_area_vs_previous"])
    assert np.count_nonzero(model.weights) == 2
    with pytest.raises(FewShotSegError, match="unknown feature"):
        fit_stop_model(x, y, use=["colour"])


def test_bad_stop_models_are_one_line_errors(tmp_path):
    x, y = _separable()
    with pytest.raises(FewShotSegError, match="only one class"):
        fit_stop_model(x, np.zeros(len(x)))
    data = fit_stop_model(x, y).to_dict()
    path = tmp_path / "old.json"
    # fitted by an older version over fewer features: it loads, and the missing one weighs nothing
    older = {**data, **{k: data[k][:-1] for k in ("features", "weights", "mean", "scale")}}
    path.write_text(json.dumps(older))
    loaded = load_stop_model(path)
    assert loaded.weights[-1] == 0 and np.allclose(loaded.weights[:-1], data["weights"][:-1])
    # a feature this version does not know, or arrays that do not fit the names: one line each
    path.write_text(json.dumps({**data, "features": data["features"][:-1] + ["from_the_future"]}))
    with pytest.raises(FewShotSegError, match="fit it again") as info:
        load_stop_model(path)
    assert "\n" not in str(info.value)
    path.write_text(json.dumps({**data, "features": data["features"][:-1]}))
    with pytest.raises(FewShotSegError, match="one value per feature"):
        load_stop_model(path)
    path.write_text("{not json")
    with pytest.raises(FewShotSegError, match="unreadable"):
        load_stop_model(path)
    assert load_stop_model(tmp_path / "absent.json") is None


def test_the_shipped_stop_model_loads():
    assert stop_model_path() is not None, "Resources/Models/fewshotseg-propagator.stop.json is missing"
    model = load_stop_model()
    assert isinstance(model, StopModel) and model.weights.shape == (len(FEATURES),)
    assert model.info["structures"] > 10 and "CHAOS" in model.info["data"]


def test_features_do_not_depend_on_the_step_count():
    """The same numbers at step 1 and step 90: a 1 mm CT reads like an 8 mm MRI."""
    f = step_features(0.8, 500, 1000, 550, 500, 40, True, 90)
    assert f.shape == (len(FEATURES),) and np.isfinite(f).all()
    assert f[FEATURES.index("narrowing")] == 1.0


def test_unknown_stop_rule_is_refused():
    with pytest.raises(FewShotSegError, match="unknown stop rule"):
        PropagationOptions(stop="sometimes").validate()


def _chaos(chaos_dir, case: str):
    image = sitk.ReadImage(str(chaos_dir / f"image_{case}.nii.gz"))
    return image, sitk.GetArrayFromImage(sitk.ReadImage(str(chaos_dir / f"label_{case}.nii.gz")))


@needs_stepper
def test_stop_rules_on_a_walk_that_runs_past_the_liver(chaos_dir):
    """CHAOS case 19 (not fitted on), liver painted at its largest slice and near its lower
    tip: the fixed rules let the walk from the tip run on over tissue below the liver; the
    stop model ends it; with no stop rule it runs further still."""
    from FewShotSegLib.checkpoints import load_for_mode

    image, label = _chaos(chaos_dir, "19")
    truth = label == 1
    support = np.zeros_like(truth)
    support[[14, 23]] = truth[[14, 23]]
    stepper = load_for_mode(None, "learned")
    below = {}
    for stop in ("rules", "learned", "none"):
        result = propagate(image, support, stepper, PropagationOptions(mode="learned", stop=stop))
        below[stop] = int(result.mask[:9].sum())          # the liver ends at slice 9
        assert (result.mask[[14, 23]] == truth[[14, 23]]).all()
    assert below["learned"] < 0.25 * below["rules"]
    assert below["none"] >= below["rules"]


@needs_stepper
def test_fit_stop_writes_a_model_the_engine_reads(chaos_dir, tmp_path, monkeypatch):
    from Training import fit_stop

    out, examples = tmp_path / "stop.json", tmp_path / "examples.npz"
    assert fit_stop.cli(["--out", str(out), "--chaos", "1", "--ct-per-scan", "0", "--examples", str(examples)]) == 0
    model = load_stop_model(out)
    assert model.info["steps"] > 50 and examples.is_file()
    # refitting from the saved examples (a feature subset) walks nothing again
    again = tmp_path / "again.json"
    assert fit_stop.cli(["--out", str(again), "--examples", str(examples), "--features", "agreement"]) == 0
    assert np.count_nonzero(load_stop_model(again).weights) == 1
    monkeypatch.setattr("FewShotSegLib.propagation.load_stop_model", lambda **_: model)
    image, label = _chaos(chaos_dir, "1")
    support = np.zeros_like(label == 2)
    z = int(np.argmax((label == 2).sum((1, 2))))
    support[z] = (label == 2)[z]
    from FewShotSegLib.checkpoints import load_for_mode
    session = PropagationSession()
    propagate(image, support, load_for_mode(None, "learned"), PropagationOptions(mode="learned", stop="learned"),
              session=session)
    assert any(w.features for w in session.walks.values())


def test_fit_stop_bad_input_is_one_line(tmp_path, capsys):
    from Training import fit_stop

    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 2)), y=np.zeros(3), structures=1, features_names=np.array(["a", "b"]))
    assert fit_stop.cli(["--out", str(tmp_path / "o.json"), "--examples", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "o.json").exists()


def test_learned_stop_without_a_fitted_model_is_one_line(monkeypatch):
    monkeypatch.setattr("FewShotSegLib.propagation.load_stop_model", lambda **_: None)
    array = np.random.default_rng(0).normal(0.2, 0.05, (8, 32, 32)).astype(np.float32)
    support = np.zeros(array.shape, bool)
    support[4, 8:24, 8:24] = True
    with pytest.raises(FewShotSegError, match="no fitted stop model is installed") as info:
        propagate(sitk.GetImageFromArray(array), support, None, PropagationOptions(mode="registration", stop="learned"))
    assert "\n" not in str(info.value)


def _bright_block_command(tmp_path, slices: int, block: slice, painted_slice: int) -> tuple:
    """A noisy volume with a bright block on ``block`` slices, one slice of it painted: the
    `fewshotseg propagate` arguments (registration mode) and the output path."""
    array = np.random.default_rng(0).normal(0.2, 0.05, (slices, 32, 32)).astype(np.float32)
    array[block, 8:24, 8:24] += 1.0
    image, support, out = tmp_path / "image.nii.gz", tmp_path / "support.nii.gz", tmp_path / "out.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(image))
    painted = np.zeros(array.shape, np.uint8)
    painted[painted_slice, 8:24, 8:24] = 1
    sitk.WriteImage(sitk.GetImageFromArray(painted), str(support))
    return ["propagate", str(image), "--support", str(support), "--mode", "registration", "-q", "-o", str(out)], out


def test_cli_stop_option(tmp_path, capsys):
    from FewShotSegLib import cli
    args, out = _bright_block_command(tmp_path, 8, slice(2, 7), 4)
    assert cli.main(args + ["--stop", "learned"]) == 0
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out)))[2:7].any()


def _walk_with(areas: list, agreement: list):
    from FewShotSegLib.walks import Walk
    w = Walk()
    for i, (a, g) in enumerate(zip(areas, agreement), start=1):
        w.probs[i], w.areas[i], w.agreement[i] = np.full((2, 2), 0.9, np.float32), float(a), float(g)
    return w


def test_a_walk_into_an_absent_slice_ends_after_its_waist():
    """A walk that reached a slice marked absent narrows to a waist and widens again (it slid
    onto a neighbour): it ends after the waist, although its intensities agree all along. A
    walk that only narrows is left to the agreement cut, which finds no fall here."""
    from FewShotSegLib.walks import _end_at_least_agreement, _end_at_waist
    slices = list(range(1, 9))
    waist = _walk_with([900, 700, 400, 150, 300, 600, 900, 1200], [0.95] * 8)
    _end_at_waist(waist, slices, 1000.0)
    assert sorted(waist.probs) == [1, 2, 3, 4] and sorted(waist.areas) == [1, 2, 3, 4]
    assert waist.stop == {"slice": 5, "reason": "absent", "area_fraction": 0.15}
    narrowing = _walk_with([900, 700, 400, 150, 140, 120, 100, 90], [0.95] * 8)
    _end_at_waist(narrowing, slices, 1000.0)
    _end_at_least_agreement(narrowing, slices, 1000.0)
    assert narrowing.stop is None and sorted(narrowing.probs) == slices
    # small wobbles (within 1.3x of the narrowest mask) are not a waist
    wobble = _walk_with([900, 700, 400, 150, 160, 180, 190, 170], [0.95] * 8)
    _end_at_waist(wobble, slices, 1000.0)
    assert wobble.stop is None


@needs_stepper
def test_a_vein_painted_lengthwise_stops_before_the_slice_marked_absent(shared_data):
    """The inferior vena cava of a TotalSegmentator CT (not trained on), painted in a sagittal
    slice, with a sagittal slice 26 slices away marked absent: the walk towards it slides onto
    the liver and widens; it now ends where the vein ends (it ended at the absent slice)."""
    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.evaluation import label_array
    from FewShotSegLib.imageio import array_axis_for, read_image
    from FewShotSegLib.metrics import dice
    image = read_image(shared_data / "totalseg" / "ct_small_3mm.nii.gz")
    truth = label_array(shared_data / "totalseg" / "ct_small_3mm_seg.nii.gz", image) == 63
    axis = array_axis_for(image, "sagittal")
    moved = np.moveaxis(truth, axis, 0)
    present = np.flatnonzero(moved.reshape(moved.shape[0], -1).any(1))
    painted = int(np.argmax(moved.reshape(moved.shape[0], -1).sum(1)))
    absent = int(present.max()) + 26
    support, exclude = np.zeros_like(truth), np.zeros_like(truth)
    np.moveaxis(support, axis, 0)[painted] = moved[painted]
    np.moveaxis(exclude, axis, 0)[absent] = True
    result = propagate(image, support, load_for_mode(None, "learned"), PropagationOptions(mode="learned"),
                       exclude=exclude)
    assert result.axis_index == axis
    beyond = np.moveaxis(result.mask, axis, 0)[int(present.max()) + 3:]
    assert int(beyond.sum()) == 0
    assert dice(result.mask > 0, truth) > 0.75


def test_cli_walk_step_option(tmp_path, capsys):
    """--walk-step-mm reaches the engine: a bad value is one line and nothing is written; 2 mm
    across 1 mm slices fills the block as every-slice steps do."""
    from FewShotSegLib import cli
    args, out = _bright_block_command(tmp_path, 16, slice(2, 14), 8)
    assert cli.main(args + ["--walk-step-mm", "-2"]) == 2
    assert "walk_step_mm" in capsys.readouterr().err and not out.exists()
    assert cli.main(args + ["--walk-step-mm", "2"]) == 0
    stepped = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert cli.main(args) == 0
    every = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert stepped[3:13, 10:22, 10:22].all()
    assert np.abs(stepped.astype(int) - every.astype(int)).sum() < 0.05 * every.sum()
