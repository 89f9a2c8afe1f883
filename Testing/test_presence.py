"""The step network's presence read-out (options.presence): its features, its fit on real
walks (Training/fit_presence.py) and how it ends a walk."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from FewShotSegLib.checkpoints import load_for_mode, save_checkpoint
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.fitted import LinearModel
from FewShotSegLib.metrics import dice
from FewShotSegLib.model_store import DEFAULT_PROPAGATOR, list_model_files, resolve_model_path
from FewShotSegLib.models import build_model
from FewShotSegLib.models.slicestep import presence_feature_names, presence_features
from FewShotSegLib.preprocessing import PreprocessConfig
from FewShotSegLib.propagation import PropagationOptions, propagate
from FewShotSegLib.stopping import load_presence_model, presence_features_of

SHIPPED = DEFAULT_PROPAGATOR in {e.name for e in list_model_files()}


def test_presence_features_read_the_networks_own_pass():
    """forward_features is forward plus what the read-out reads; one named column each."""
    net = build_model("slicestep", widths=[8, 16, 24]).eval()
    torch.nn.init.normal_(net.head.weight, std=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 80, 80, generator=g)
    x[:, 2:] = (x[:, 2:] > 0).float()
    correction, deep, top = net.forward_features(x)
    assert torch.equal(correction, net(x)) and deep.shape[1] == 24 and top.shape == (3, 8, 80, 80)
    feats = presence_features(x, net.logits(x), deep, top)
    names = presence_feature_names(net)
    assert feats.shape == (3, len(names)) and len(set(names)) == len(names) and torch.isfinite(feats).all()
    # the carried mask's inside and outside are told apart
    inside, outside = feats[:, 24:32], feats[:, 32:40]
    assert not torch.allclose(inside, outside)


def _case(chaos_dir, case: str):
    from FewShotSegLib.evaluation import load_chaos_case
    return load_chaos_case(chaos_dir.parent, case)


def _painted_largest(truth: np.ndarray) -> np.ndarray:
    z = int(np.argmax(truth.sum((1, 2))))
    support = np.zeros_like(truth)
    support[z] = truth[z]
    return support


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_fit_presence_on_real_walks_and_end_a_walk_with_it(chaos_dir, tmp_path, capsys):
    """Fitted on the shipped network's never-stopping walks over one CHAOS case's organs
    (axial and coronal), the read-out tells the walks' wrong steps from the right ones
    (balanced accuracy on its own examples), it is found beside its network, and a
    propagation with it on another case's organ stays accurate."""
    from Training import fit_presence
    net_path = tmp_path / "net.pt"
    shutil.copy(resolve_model_path(DEFAULT_PROPAGATOR), net_path)
    out = tmp_path / "net.presence.json"
    assert fit_presence.main(["--stepper", str(net_path), "--chaos", "2", "--ct-per-scan", "0",
                              "--planes", "axial,coronal", "--zero-motion-max-mm", "100",
                              "--data", str(chaos_dir.parent), "--out", str(out)]) == 0
    stepper = load_for_mode(str(net_path), "learned")
    model = load_presence_model(stepper.model, beside=net_path)
    assert model is not None and model.info["planes"] == ["axial", "coronal"]
    assert model.info["wrong_steps"] > 10 and model.info["train_accuracy_balanced"] >= 0.8
    image, label = _case(chaos_dir, "1")
    truth = label == 2
    options = PropagationOptions(presence=True, zero_motion_max_mm=100)
    result = propagate(image, _painted_largest(truth), stepper, options)
    assert dice(result.mask > 0, truth) >= 0.8


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_a_read_out_that_judges_every_step_wrong_ends_walks_at_once(chaos_dir, tmp_path):
    """A read-out whose bias alone says "wrong" ends every outward walk at its first step:
    only the painted slice is left; one that never says so leaves the default's result."""
    net_path = tmp_path / "net.pt"
    shutil.copy(resolve_model_path(DEFAULT_PROPAGATOR), net_path)
    stepper = load_for_mode(str(net_path), "learned")
    names = presence_features_of(stepper.model)
    image, label = _case(chaos_dir, "1")
    truth = label == 3
    support = _painted_largest(truth)
    options = PropagationOptions(presence=True)
    for bias, painted_only in ((20.0, True), (-20.0, False)):
        model = LinearModel(names, np.zeros(len(names)), bias, np.zeros(len(names)), np.ones(len(names)))
        (tmp_path / "net.presence.json").write_text(json.dumps(model.to_dict()))
        mask = propagate(image, support, stepper, options).mask > 0
        filled = np.flatnonzero(mask.any((1, 2)))
        assert (len(filled) == 1) == painted_only
    assert np.array_equal(mask, propagate(image, support, stepper, PropagationOptions()).mask > 0)


def test_presence_needs_a_read_out_fitted_for_that_network(tmp_path, chaos_dir):
    """Another network's read-out is never used (it reads that network's features): a
    checkpoint with none beside it is one clear error."""
    net = build_model("slicestep")
    path = tmp_path / "mine.pt"
    save_checkpoint(path, net, kind="propagator", preprocess=PreprocessConfig(), provenance={"data": "none"})
    image, label = _case(chaos_dir, "1")
    with pytest.raises(FewShotSegError, match="no presence model is fitted for this step network"):
        propagate(image, _painted_largest(label == 2), load_for_mode(str(path), "learned"),
                  PropagationOptions(presence=True))
    with pytest.raises(FewShotSegError, match="presence must be true or false"):
        PropagationOptions(presence="yes").validate()


def test_a_presence_output_learns_where_a_structure_ends(chaos_dir):
    """Walk steps of a real CHAOS case (four organs, made by the training path; the steps
    past an organ's end have empty targets): a few dozen steps of the presence loss on a
    small network tell those steps from the others on the examples it trained on."""
    from FewShotSegLib.evaluation import load_chaos_case
    from FewShotSegLib.preprocessing import prepare_volume
    from Training.step_pairs import volume_examples
    from FewShotSegLib.models.slicestep import PRESENT_PIXELS
    image, label = load_chaos_case(chaos_dir.parent, "1")
    prepared = prepare_volume(image, "axial", PreprocessConfig())
    masks = [prepared.mask_to_model(label == organ) for organ in (1, 2, 3, 4)]
    x, y = volume_examples(prepared.slices, masks, np.random.default_rng(0))
    x = torch.from_numpy(x).float()
    present = ((torch.from_numpy(y) > 127).flatten(1).sum(1) >= PRESENT_PIXELS).float()
    assert 4 <= int((present == 0).sum()) < len(present) // 2
    torch.manual_seed(0)
    net = build_model("slicestep", widths=[8, 16, 24], presence=True)
    correction, logit = net(x[:4], with_presence=True)
    assert correction.shape == (4, 1, 80, 80) and logit.shape == (4,)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for step in range(60):
        batch = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[batch], with_presence=True)[1],
                                                                    present[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        score = net(x, with_presence=True)[1]
    ended, going = score[present == 0], score[present == 1]
    auroc = float((ended[:, None] < going[None, :]).float().mean())
    assert auroc >= 0.8


def test_train_stepper_adds_a_presence_output_to_a_network(tmp_path):
    """--presence with --init: the started network's weights stay, the new output is
    trained and kept in the checkpoint; the engine then ends walks with it."""
    import Training.train_stepper as trainer
    rng = np.random.default_rng(0)
    folder = tmp_path / "examples"
    folder.mkdir()
    inputs = rng.standard_normal((24, 4, 32, 32)).astype(np.float16)
    inputs[:, 2:] = inputs[:, 2:] > 0
    targets = (inputs[:, 3] * 255).astype(np.uint8)
    targets[::3] = 0                                   # a third of the steps past the end
    np.savez(folder / "a.npz", inputs=inputs, targets=targets)
    start = save_checkpoint(tmp_path / "start.pt", build_model("slicestep", widths=[8, 16], crop=32),
                            kind="propagator", preprocess=PreprocessConfig(), provenance={"test": True}, half=False)
    out = tmp_path / "run"
    assert trainer.main([str(folder), "--out", str(out), "--batch", "4", "--steps", "3", "--init", str(start),
                         "--presence"]) == 0
    loaded = load_for_mode(str(out / "stepper.pt"), "learned")
    assert loaded.model.config["presence"] and loaded.provenance["presence"]
    assert hasattr(loaded.model, "presence_head")


def test_a_network_whose_presence_output_says_ended_stops_at_once(chaos_dir, tmp_path):
    """A network with a presence output whose bias says "ended" ends every outward walk at
    its first step (options.presence; no fitted read-out needed); without the option the
    output is not read."""
    net = build_model("slicestep", presence=True).eval()
    torch.nn.init.zeros_(net.presence_head[2].weight)
    torch.nn.init.constant_(net.presence_head[2].bias, -20.0)
    path = save_checkpoint(tmp_path / "ended.pt", net, kind="propagator", preprocess=PreprocessConfig(),
                           provenance={"test": True}, half=False)
    stepper = load_for_mode(str(path), "learned")
    image, label = _case(chaos_dir, "1")
    support = _painted_largest(label == 3)
    with_output = propagate(image, support, stepper, PropagationOptions(presence=True)).mask > 0
    without = propagate(image, support, stepper, PropagationOptions()).mask > 0
    assert len(np.flatnonzero(with_output.any((1, 2)))) == 1 and len(np.flatnonzero(without.any((1, 2)))) > 3
    # fitting a stop model (stop 'none') reads the output but never stops on it
    never = propagate(image, support, stepper, PropagationOptions(stop="none", presence=True)).mask > 0
    assert len(np.flatnonzero(never.any((1, 2)))) > 3
    # registration mode has no network to ask: said, not silently ignored
    asked = propagate(image, support, None, PropagationOptions(mode="registration", presence=True))
    assert any("presence applies to the step network" in w for w in asked.warnings)
