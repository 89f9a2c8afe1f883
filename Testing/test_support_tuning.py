"""Test-time tuning on the support scan's labelled slices (FewShotSegLib/support_tuning.py, row
``<model>+tune``): the checkpoint's model is left as it was, the tuned copy is reproducible
and learns from the examples, frozen layers stay frozen, and the protocol row scores EP1
only (EP2 allows one labelled slice) with its errors clear."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from FewShotProtocol import protocol as P
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.models import build_model
from FewShotSegLib.preprocessing import PreprocessConfig
from FewShotSegLib.support_tuning import tuned_on_support
from Training.train import EpisodeLoss, freeze_early_layers

from test_protocol import run_protocol


def _examples(size=64):
    """Two slices of a bright square 'organ' on a darker body, at two places."""
    images = torch.full((2, size, size), -1.0)
    masks = torch.zeros(2, size, size)
    for k, (y, x) in enumerate(((16, 20), (24, 28))):
        images[k, y:y + 20, x:x + 20] = 2.0
        masks[k, y:y + 20, x:x + 20] = 1.0
    return {1: (images, masks)}


def _episode_loss(model, examples) -> float:
    """The tuning objective on the un-augmented pair (slice 0 supports slice 1)."""
    images, masks = examples[1]
    probe = copy.deepcopy(model).train()   # train mode as in tuning; its statistics move in the copy
    with torch.no_grad():
        seg, align = EpisodeLoss(probe, [0.05, 1.0], 1.0)(images[:1], masks[:1], images[1:], masks[1:])
    return float(seg + align)


def test_tuning_returns_a_reproducible_copy_that_fits_the_examples_and_keeps_frozen_layers():
    torch.manual_seed(0)
    model = build_model("crtpnet", backbone="effnet-lite0", pretrained=False).eval()
    freeze_early_layers(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    examples = _examples()
    start = _episode_loss(model, examples)
    # 80 steps: at 40 the loss on this one un-augmented pair fell by 13-52 % depending on
    # the torch thread count (summation order); at 80 by 46-65 % for 1 and 2 threads
    tuned = tuned_on_support(model, examples, steps=80, lr=1e-3, seed=3)
    again = tuned_on_support(model, examples, steps=80, lr=1e-3, seed=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())        # checkpoint kept
    params = dict(tuned.named_parameters())
    assert frozen and all(torch.equal(params[n], dict(model.named_parameters())[n]) for n in frozen)
    assert any(not torch.equal(params[n], p) for n, p in model.named_parameters() if n not in frozen)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), again.state_dict().values()))
    assert not tuned.training and _episode_loss(tuned, examples) < 0.7 * start            # it learned


def test_tuning_takes_its_augmentation_from_the_caller():
    """+ir tunes with random intensity curves: another copy than the default augmentation's,
    as reproducible."""
    from FewShotSegLib.augmentation import AugmentConfig
    torch.manual_seed(0)
    model = build_model("alpnet", backbone="effnet-lite0", pretrained=False).eval()
    curved = [tuned_on_support(model, _examples(), steps=3, lr=1e-3, seed=1,
                               augment_cfg=AugmentConfig(intensity_remap=1.0)) for _ in range(2)]
    default = tuned_on_support(model, _examples(), steps=3, lr=1e-3, seed=1)
    same = [torch.equal(a, b) for a, b in zip(curved[0].state_dict().values(), curved[1].state_dict().values())]
    differ = [torch.equal(a, b) for a, b in zip(curved[0].state_dict().values(), default.state_dict().values())]
    assert all(same) and not all(differ)


def test_tuning_refuses_examples_without_the_organ():
    model = build_model("alpnet", backbone="effnet-lite0", pretrained=False)
    images, masks = _examples()[1]
    with pytest.raises(FewShotSegError, match="labelled support slice"):
        tuned_on_support(model, {1: (images, torch.zeros_like(masks))}, steps=1, lr=1e-3)
    with pytest.raises(FewShotSegError, match="steps must be"):
        tuned_on_support(model, _examples(), steps=-1, lr=1e-3)


def test_tune_rows_tune_each_episode_on_its_own_labelled_slices(chaos_dir, tmp_path, monkeypatch):
    """With 0 steps the +tune row scores exactly as the plain one (the EP1-only and EP2-only
    evaluations merge back into one); with steps, both episodes are scored and say so."""
    def run(steps, name):
        monkeypatch.setitem(P.SUPPORT_TUNING, "steps", steps)
        assert run_protocol(tmp_path, "--models", "crtpnet", "--settings", "1", "--steps", "1",
                            "--test-time", "tune", "--run-name", name) == 0
        return json.loads((tmp_path / "results" / "protocol" / name / "crtpnet+tune" / "fold_0_s1.json").read_text())

    untuned, tuned = run(0, "t0"), run(3, "t3")
    plain = json.loads((tmp_path / "results" / "protocol" / "t0" / "crtpnet" / "fold_0_s1.json").read_text())
    for key in ("ep1", "ep1_post", "ep2", "ep2_post"):
        assert [r[key]["dice"] for r in untuned["rows"]] == pytest.approx([r[key]["dice"] for r in plain["rows"]])
        assert all(r[key] is not None for r in tuned["rows"])
    assert tuned["key"]["support_tuning"]["steps"] == 3 and "support_tuning" not in plain["key"]
    assert any("test-time tuning" in n and "EP2: the one" in n for n in tuned["notes"])
    for episode, count in (("ep1", 3), ("ep2", 1)):
        examples = P.support_examples(chaos_dir.parent, tuned["support"], list(P.CLASSES),
                                      PreprocessConfig(size=64), episode)
        assert all(len(imgs) == count and masks.amax() > 0.5 for imgs, masks in examples.values())
    ev1, ev2 = P.FoldEvaluation(rows=[{"case": "1", "class": 1}]), P.FoldEvaluation(rows=[{"case": "1", "class": 2}])
    with pytest.raises(FewShotSegError, match="different scans or classes"):
        P.merged_episodes(ev1, ev2)
