"""The walk's step network (models/slicestep.py), its training (Training/step_pairs.py,
Training/train_stepper.py), its checkpoint kind and the learned propagation mode."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FewShotSegLib.checkpoints import load_checkpoint, load_for_mode, save_checkpoint
from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.metrics import dice
from FewShotSegLib.model_store import DEFAULT_PROPAGATOR, list_model_files, resolve_model_path
from FewShotSegLib.models import build_model
from FewShotSegLib.models.slicestep import crop_box, crop_boxes, next_mask_probability, next_mask_step, paste, step_inputs
from FewShotSegLib.preprocessing import PreprocessConfig, prepare_volume
from FewShotSegLib.propagation import PropagationOptions, propagate

SHIPPED = DEFAULT_PROPAGATOR in {e.name for e in list_model_files()}


def _inputs(batch: int = 2, crop: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, crop, crop, generator=g)
    x[:, 2:] = (x[:, 2:] > 0).float()
    return x


def test_forward_backward_shapes():
    net = build_model("slicestep")
    x = _inputs()
    logits = net.logits(x)
    assert logits.shape == (2, 1, 80, 80)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_untrained_network_returns_the_carried_mask():
    """The last layer starts at zero: before training the step is registration's."""
    net = build_model("slicestep").eval()
    x = _inputs()
    probability = torch.sigmoid(net.logits(x))
    carried = x[:, 3:4].clamp(0.05, 0.95)
    assert torch.allclose(probability, carried, atol=1e-5)


def test_cpu_determinism():
    torch.manual_seed(3)
    a = build_model("slicestep")
    torch.manual_seed(3)
    b = build_model("slicestep")
    for net in (a, b):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for step in range(3):
            loss = net.logits(_inputs(seed=step)).sigmoid().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    x = _inputs(seed=9)
    assert torch.equal(a.eval().logits(x), b.eval().logits(x))


def test_crop_and_paste_round_trip():
    mask = torch.zeros(64, 64)
    mask[20:30, 25:45] = 1
    box = crop_box(mask, mask, 64)
    y0, y1, x0, x1 = box
    assert y0 <= 20 and y1 >= 30 and x0 <= 25 and x1 >= 45
    image = torch.rand(64, 64)
    x = step_inputs(image, image, mask, mask, box, crop=80)
    assert x.shape == (4, 80, 80)
    back = paste(x[3], box, 64) > 0.5
    assert dice(back.numpy(), mask.numpy() > 0) > 0.95
    assert crop_box(torch.zeros(8, 8), torch.zeros(8, 8), 8) is None
    net = build_model("slicestep").eval()
    assert float(next_mask_probability(net, image, image, torch.zeros(64, 64), torch.zeros(64, 64)).sum()) == 0.0


def test_parts_lying_apart_get_crops_of_their_own():
    """Two parts far apart: a crop each (together far smaller than the one crop round both),
    and the untrained network (which returns the carried mask) gives each part back in its
    place; parts close together, or one part, keep the one crop."""
    mask = torch.zeros(256, 256)
    mask[20:40, 20:40] = 1
    mask[200:230, 180:220] = 1
    boxes = crop_boxes(mask, mask, 256)
    assert len(boxes) == 2
    for (y0, y1, x0, x1), (py, px) in zip(sorted(boxes), [(30, 30), (215, 200)]):
        assert y0 <= py < y1 and x0 <= px < x1
    near = torch.zeros(256, 256)
    near[20:40, 20:40] = 1
    near[45:60, 30:50] = 1
    assert crop_boxes(near, near, 256) == [crop_box(near, near, 256)]
    assert crop_boxes(torch.zeros(8, 8), torch.zeros(8, 8), 8) == []
    net = build_model("slicestep").eval()
    image = torch.rand(256, 256)
    split, _ = next_mask_step(net, image, image, mask, mask, split=True)
    whole, _ = next_mask_step(net, image, image, mask, mask)
    assert dice(split.numpy() > 0.5, mask.numpy() > 0) > dice(whole.numpy() > 0.5, mask.numpy() > 0) > 0.8
    assert dice(split.numpy() > 0.5, mask.numpy() > 0) > 0.97


def test_checkpoint_round_trip_weights_only(tmp_path):
    net = build_model("slicestep", widths=[8, 16, 24]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_checkpoint(tmp_path / "step.pt", net, kind="propagator", preprocess=PreprocessConfig(),
                           provenance={"test": True}, half=False)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["kind"] == "propagator" and payload["model_name"] == "slicestep"
    loaded = load_checkpoint(path, expect_kind="propagator")
    x = _inputs(crop=80)
    assert torch.allclose(loaded.model.logits(x), net.logits(x), atol=1e-5)
    with pytest.raises(FewShotSegError, match="propagator .* but a few-shot model is needed") as err:
        load_checkpoint(path, expect_kind="fewshot")
    assert "\n" not in str(err.value)
    with pytest.raises(FewShotSegError, match="propagator .* but a refiner is needed"):
        load_checkpoint(path, expect_kind="refiner")


def test_few_shot_checkpoint_where_a_propagator_is_needed():
    path = resolve_model_path(None)   # the shipped few-shot model
    with pytest.raises(FewShotSegError, match="few-shot model .* but a propagator") as err:
        load_checkpoint(path, expect_kind="propagator")
    assert "\n" not in str(err.value)


def test_the_mode_must_fit_the_model_kind():
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((6, 32, 32)).astype(np.float32))
    support = np.zeros((6, 32, 32), bool)
    support[3, 10:20, 10:20] = True
    stepper = build_model("slicestep")
    with pytest.raises(FewShotSegError, match="is a propagator .* use mode 'learned'"):
        propagate(image, support, stepper, PropagationOptions(mode="chained"))
    fewshot = load_for_mode(None, "chained")
    with pytest.raises(FewShotSegError, match="mode 'learned' needs a propagator checkpoint"):
        propagate(image, support, fewshot, PropagationOptions(mode="learned"))


def _chaos_case(chaos_dir, case: str):
    image = sitk.ReadImage(str(chaos_dir / f"image_{case}.nii.gz"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(chaos_dir / f"label_{case}.nii.gz")))
    return image, label


def test_training_steps_lower_the_loss_on_a_real_volume(chaos_dir):
    """Examples from a real CHAOS case, made by the same path as the training run; a few
    dozen steps lower the loss on a fixed batch of them."""
    from Training.step_pairs import volume_examples
    from Training.train_stepper import step_loss
    image, label = _chaos_case(chaos_dir, "1")
    prepared = prepare_volume(image, "axial", PreprocessConfig())
    masks = [prepared.mask_to_model(label == organ) for organ in (1, 2)]
    x, y = volume_examples(prepared.slices, masks, np.random.default_rng(0))
    assert len(x) > 40 and x.shape[1:] == (4, 80, 80)
    x = torch.from_numpy(x[:32]).float()
    y = torch.from_numpy(y[:32]).float()[:, None] / 255
    torch.manual_seed(0)
    net = build_model("slicestep", widths=[8, 16, 24])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(step_loss(net.logits(x), y))
    for _ in range(40):
        loss = step_loss(net.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(step_loss(net.logits(x), y))
    assert after < 0.9 * before


def test_walk_examples_follow_the_networks_own_walk(chaos_dir):
    """On-policy examples: the first step of each walk starts from the true mask, later
    ones from the network's prediction, and the walk goes past the structure's end
    (empty targets) before it stops."""
    from Training.step_pairs import walk_examples
    image, label = _chaos_case(chaos_dir, "1")
    prepared = prepare_volume(image, "axial", PreprocessConfig())
    kidney = prepared.mask_to_model(label == 2)
    net = build_model("slicestep").eval()   # untrained: it returns the carried mask
    x, y = walk_examples(prepared.slices, [kidney], net)
    present = int((kidney.flatten(1).sum(1) >= 12).sum())
    assert len(x) >= present - 1
    assert int((y.reshape(len(y), -1).max(1) == 0).sum()) >= 1     # steps past the end


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_walk_examples_with_the_zero_motion_offset_keep_their_masks_past_the_end(chaos_dir, capsys):
    """--zero-motion: the shipped network's walks across a CHAOS kidney's coronal slices
    with the offset carry larger masks onto the slices past its end (the examples a
    presence output must learn to call ended) than without; asked for without --policy,
    one line."""
    from Training.step_pairs import main, walk_examples
    image, label = _chaos_case(chaos_dir, "1")
    prepared = prepare_volume(image, "coronal", PreprocessConfig())
    kidney = prepared.mask_to_model(label == 2)
    net = load_for_mode(None, "learned").model.eval()

    def past_end_area(zero_motion):
        x, y = walk_examples(prepared.slices, [kidney], net, zero_motion=zero_motion)
        ended = y.reshape(len(y), -1).max(1) == 0
        assert ended.sum() >= 2
        return float(x[ended, 2].astype(np.float32).reshape(int(ended.sum()), -1).sum(1).mean())

    assert past_end_area(True) > 1.1 * past_end_area(False)
    assert main(["--images", str(chaos_dir / "image_1.nii.gz"), "--out", "unused", "--zero-motion"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _synthetic_examples(tmp_path, count: int):
    """A folder with one .npz of random 32x32 walk steps (the trainer's input format)."""
    rng = np.random.default_rng(count)
    folder = tmp_path / "examples"
    folder.mkdir()
    inputs = rng.standard_normal((count, 4, 32, 32)).astype(np.float16)
    inputs[:, 2:] = inputs[:, 2:] > 0
    np.savez(folder / "a.npz", inputs=inputs, targets=(inputs[:, 3] * 255).astype(np.uint8))
    return folder


def test_train_stepper_resumes(tmp_path):
    """The command writes a state, goes on from it with --resume, and ends with a
    propagator checkpoint that the engine loads."""
    import Training.train_stepper as trainer
    folder = _synthetic_examples(tmp_path, 24)
    out = tmp_path / "run"
    common = [str(folder), "--out", str(out), "--batch", "4", "--widths", "8,16", "--save-every", "2"]
    assert trainer.main(common + ["--steps", "2"]) == 0
    assert trainer.main(common + ["--steps", "4", "--resume"]) == 0
    log = (out / "log.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in log] == [2, 4]
    loaded = load_checkpoint(out / "stepper.pt", expect_kind="propagator")
    assert loaded.provenance["steps"] == 4 and loaded.config["crop"] == 32 and loaded.card["description"]


def test_intensity_likelihood_reads_the_previous_masks_histogram():
    """Where the next slice has the intensities found under the previous mask the channel
    is positive, where it has those outside it negative; no mask, no opinion (0)."""
    from FewShotSegLib.models.slicestep import intensity_likelihood
    x = torch.zeros(2, 4, 32, 32)
    x[:, 1] = -1.0
    x[:, 1, 8:20, 8:20] = 2.0            # the structure, bright, on the previous slice
    x[:, 2, 8:20, 8:20] = 1.0
    x[:, 0] = -1.0
    x[:, 0, 12:24, 12:24] = 2.0          # it moved on the next slice
    x[1, 2] = 0.0
    out = intensity_likelihood(x)
    assert out.shape == (2, 1, 32, 32)
    assert out[0, 0, 16, 16] > 0.9 and out[0, 0, 2, 2] < -0.9
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    net = build_model("slicestep", widths=[8, 16], crop=32, likelihood=True)
    assert net(x).shape == (2, 1, 32, 32)


def test_training_starts_from_a_checkpoint_with_a_new_input(tmp_path):
    """--init takes a step network's weights; with --likelihood its input layer gains a
    channel at zero weight, so before any step the new network is the old one."""
    import Training.train_stepper as trainer
    folder = _synthetic_examples(tmp_path, 24)
    common = [str(folder), "--batch", "4", "--widths", "8,16", "--save-every", "2"]
    assert trainer.main(common + ["--out", str(tmp_path / "a"), "--steps", "2"]) == 0
    first = load_checkpoint(tmp_path / "a" / "stepper.pt", expect_kind="propagator").model
    widened = build_model("slicestep", widths=[8, 16], crop=32, likelihood=True)
    trainer._load_widened(widened, trainer._initial_weights(tmp_path / "a" / "stepper.pt")[0], tmp_path)
    x = _inputs(2, 32)
    assert torch.allclose(widened.eval()(x), first.eval()(x), atol=1e-5)
    assert trainer.main(common + ["--out", str(tmp_path / "b"), "--steps", "2", "--likelihood",
                                  "--init", str(tmp_path / "a" / "stepper.pt")]) == 0
    loaded = load_checkpoint(tmp_path / "b" / "stepper.pt", expect_kind="propagator")
    assert loaded.config["likelihood"] is True and loaded.provenance["init"]
    # started from that network without --likelihood, the input it had stays
    assert trainer.main(common + ["--out", str(tmp_path / "d"), "--steps", "2",
                                  "--init", str(tmp_path / "b" / "stepper.pt")]) == 0
    assert load_checkpoint(tmp_path / "d" / "stepper.pt", expect_kind="propagator").config["likelihood"] is True
    with pytest.raises(FewShotSegError, match="weight"):
        trainer._load_widened(build_model("slicestep", widths=[8, 24], crop=32),
                              trainer._initial_weights(tmp_path / "a" / "stepper.pt")[0], tmp_path)
    few_shot = tmp_path / "few_shot.pt"
    save_checkpoint(few_shot, build_model("alpnet", pretrained=False), preprocess=PreprocessConfig(size=64),
                    provenance={"purpose": "tests"})
    assert trainer.cli(common + ["--out", str(tmp_path / "c"), "--steps", "2", "--init", str(few_shot)]) == 2


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_learned_mode_on_a_held_out_chaos_organ(chaos_dir):
    """On a CHAOS case whose labels the shipped step network never saw, one painted slice:
    learned mode is at least as good as registration alone, and good."""
    image, label = _chaos_case(chaos_dir, "21")
    truth = label == 3   # left kidney
    z = int(np.argmax(truth.sum((1, 2))))
    support = np.zeros_like(truth)
    support[z] = truth[z]
    learned = propagate(image, support, load_for_mode(None, "learned"), PropagationOptions(mode="learned"))
    registration = propagate(image, support, None, PropagationOptions(mode="registration"))
    d_learned, d_registration = dice(learned.mask > 0, truth), dice(registration.mask > 0, truth)
    assert d_learned >= d_registration - 0.005 and d_learned > 0.8
    assert np.array_equal(learned.mask[z] > 0, truth[z])


def test_averaged_walks_count_a_missing_slice_as_zero():
    from FewShotSegLib.propagation import averaged
    one, two = torch.ones(2, 2), torch.full((2, 2), 0.5)
    out = averaged({1: one, 2: one}, {2: two, 3: two}, 0.4)
    assert torch.allclose(out[1], one * 0.6) and torch.allclose(out[2], one * 0.6 + two * 0.4)
    assert torch.allclose(out[3], two * 0.4) and sorted(out) == [1, 2, 3]
    with pytest.raises(FewShotSegError, match="registration_walk_weight must lie in"):
        PropagationOptions(registration_walk_weight=1.5).validate()


def _spleen_painted_once(chaos_dir):
    """CHAOS case 1's spleen painted on its largest slice: the image, the support, that
    slice, the shipped step network and registration mode's probability."""
    image, label = _chaos_case(chaos_dir, "1")
    truth = label == 4   # spleen
    z = int(np.argmax(truth.sum((1, 2))))
    support = np.zeros_like(truth)
    support[z] = truth[z]
    registration = propagate(image, support, None, PropagationOptions(mode="registration")).probability
    return image, support, z, load_for_mode(None, "learned"), registration


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_the_registration_walk_beside_the_network(chaos_dir):
    """Learned mode averages the network's walk with a registration-only walk: weight 1 is
    registration mode's probability exactly, weight 0 the network's alone, the default lies
    between them; a second run on the same session reuses both kinds of walk."""
    from FewShotSegLib.propagation import PropagationSession
    image, support, z, stepper, registration = _spleen_painted_once(chaos_dir)
    only_registration = propagate(image, support, stepper, PropagationOptions(registration_walk_weight=1.0))
    assert np.allclose(only_registration.probability, registration, atol=1e-6)
    network = propagate(image, support, stepper, PropagationOptions(registration_walk_weight=0.0)).probability
    session = PropagationSession()
    default = propagate(image, support, stepper, PropagationOptions(), session=session)
    expected = 0.6 * network + 0.4 * registration
    expected[z] = support[z]
    assert np.allclose(default.probability, expected, atol=1e-4)
    again = propagate(image, support, stepper, PropagationOptions(), session=session)
    assert again.walks_computed == 0 and again.walks_reused == 4 and np.array_equal(again.mask, default.mask)


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_the_registration_averaged_into_every_step(chaos_dir):
    """step_registration_weight: 1 makes every step the carried mask (registration mode's
    walk exactly), 0 the network's; between, the walk keeps more of the carried mask."""
    image, support, z, stepper, registration = _spleen_painted_once(chaos_dir)
    carried = propagate(image, support, stepper, PropagationOptions(registration_walk_weight=0.0,
                                                                    step_registration_weight=1.0))
    assert np.allclose(carried.probability, registration, atol=1e-6)
    quarter = propagate(image, support, stepper, PropagationOptions(step_registration_weight=0.25))
    plain = propagate(image, support, stepper, PropagationOptions())
    assert not np.array_equal(quarter.probability, plain.probability)
    with pytest.raises(FewShotSegError, match="step_registration_weight must lie in"):
        PropagationOptions(step_registration_weight=-0.1).validate()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_train_stepper_under_torchrun(tmp_path):
    """Two gloo processes, as on a GPU node: both train, rank 0 alone writes, the
    checkpoint records the global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    folder = _synthetic_examples(tmp_path, 16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "Training.train_stepper", str(folder), "--out", str(tmp_path / "run"),
                           "--steps", "3", "--batch", "2", "--widths", "8,16", "--save-every", "3", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1
    loaded = load_checkpoint(tmp_path / "run" / "stepper.pt", expect_kind="propagator")
    assert loaded.provenance["batch"] == 4 and "2 process(es)" in loaded.provenance["hardware"]


def test_training_commands_end_bad_input_in_one_line(tmp_path, capsys):
    import Training.step_pairs as step_pairs
    import Training.train_stepper as trainer
    assert trainer.cli([str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    sources = tmp_path / "sources.json"
    sources.write_text('[{"image": "%s"}]' % (tmp_path / "missing.nii.gz"))
    assert step_pairs.main([str(sources), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no step examples" in err[0] and "missing.nii.gz" in err[1]
    assert not (tmp_path / "run").exists() and not list((tmp_path / "out").glob("*.npz"))
    with pytest.raises(FewShotSegError, match="few-shot model .* but a propagator"):
        load_for_mode(resolve_model_path(None), "learned")   # the shipped few-shot model, named


def _blob_volume(path, seed: int):
    """A small synthetic scan: a bright ellipsoid in noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:10, :40, :40]
    inside = ((z - 5) / 4.0) ** 2 + ((y - 20) / 10.0) ** 2 + ((x - 18) / 8.0) ** 2 <= 1
    image = sitk.GetImageFromArray((inside * 300 + rng.normal(0, 20, (10, 40, 40))).astype(np.int16))
    image.SetSpacing((2.0, 2.0, 4.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_examples_from_a_folder_of_unlabeled_scans(tmp_path, capsys):
    """--images: every scan a glob matches gives supervoxel examples; scans of one name in
    different folders get distinct files; two worker processes make the same examples as one."""
    import Training.step_pairs as step_pairs
    for k, folder in enumerate(("s0001", "s0002")):
        _blob_volume(tmp_path / "scans" / folder / "ct.nii.gz", k)
    pattern = str(tmp_path / "scans" / "*" / "ct.nii.gz")
    args = ["--images", pattern, "--supervoxels", "3", "--seed", "5"]
    assert step_pairs.main(args + ["--out", str(tmp_path / "one")]) == 0
    assert step_pairs.main(args + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "one").glob("*.npz"))
    assert names == ["s0001_ct_axial.npz", "s0002_ct_axial.npz"]
    for name in names:
        one, two = np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
        assert len(one["inputs"]) > 0 and np.array_equal(one["inputs"], two["inputs"])
        assert np.array_equal(one["targets"], two["targets"])
    capsys.readouterr()
    assert step_pairs.main(["--images", str(tmp_path / "nothing" / "*.nii.gz"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no file or folder matches" in err[0]
    policy = save_checkpoint(tmp_path / "policy.pt", build_model("slicestep", widths=[8, 16]), kind="propagator",
                             preprocess=PreprocessConfig(), provenance={"test": True}, half=False)
    assert step_pairs.main(args + ["--out", str(tmp_path / "walks"), "--policy", str(policy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labelled structures only" in err[0] and not (tmp_path / "walks").exists()
    assert step_pairs.main(args + ["--out", str(tmp_path / "axes"), "--axes", "axial,foo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown axis 'foo'" in err[0] and not (tmp_path / "axes").exists()


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_zero_motion_offset_keeps_a_mask_where_nothing_moved(chaos_dir):
    """A real CHAOS liver slice stepping onto itself: the shipped network trims it (the
    bias that compounds across thin slices: 9 % in ten steps when measured); with the
    zero-motion offset it keeps its area, also after ten such steps. An untrained network
    needs none."""
    from FewShotSegLib.models.slicestep import zero_motion_offset
    image, label = _chaos_case(chaos_dir, "1")
    prepared = prepare_volume(image, "axial", PreprocessConfig())
    truth = label == 1
    z = int(np.argmax(truth.sum((1, 2))))
    mask = (prepared.mask_to_model(truth, [z])[0] > 0.5).float()
    slice_ = prepared.model_slices([z])[0].float()
    net = load_for_mode(None, "learned")
    net = getattr(net, "model", net)
    area = float(mask.sum())

    def walked(offset, steps):
        m = mask
        for _ in range(steps):
            m = (next_mask_probability(net, slice_, slice_, m, m, offset) >= 0.5).float()
        return float(m.sum())

    offset = zero_motion_offset(net, slice_, mask)
    assert abs(offset) <= 2.0 and (offset > 0) == (walked(0.0, 1) < area)
    assert abs(walked(offset, 1) - area) <= 0.01 * area and walked(offset, 10) >= 0.95 * area
    assert abs(zero_motion_offset(build_model("slicestep").eval(), slice_, mask)) < 0.2
    with pytest.raises(FewShotSegError, match="zero_motion_max_mm"):
        PropagationOptions(zero_motion_max_mm=-1).validate()


def _painted_in(truth: np.ndarray, axis: int, slices) -> np.ndarray:
    support = np.zeros_like(truth)
    for z in slices:
        index = [slice(None)] * 3
        index[axis] = z
        support[tuple(index)] = truth[tuple(index)]
    return support


@pytest.mark.skipif(not SHIPPED, reason=f"the shipped step network ({DEFAULT_PROPAGATOR}.pt) is not installed")
def test_zero_motion_offset_only_between_painted_slices_close_together(chaos_dir):
    """zero_motion_max_mm: painted in two coronal slices of a CHAOS spleen (1.25 mm apart),
    the walks between them change and the outward walks do not; painted axially (7.7 mm)
    nothing changes. After a run with one of the slices painted, the outward walk's steps
    kept by the session are not taken for the between-walk's (they differ)."""
    from FewShotSegLib.imageio import array_axis_for
    from FewShotSegLib.propagation import PropagationSession
    image, label = _chaos_case(chaos_dir, "1")
    truth = label == 4
    stepper = load_for_mode(None, "learned")
    options = PropagationOptions(zero_motion_max_mm=1.5)
    for plane in ("axial", "coronal"):
        axis = array_axis_for(image, plane)
        present = np.flatnonzero(np.moveaxis(truth, axis, 0).reshape(truth.shape[axis], -1).any(1))
        a, b = int(present[len(present) // 3]), int(present[2 * len(present) // 3])
        support = _painted_in(truth, axis, (a, b))
        on = propagate(image, support, stepper, options).probability
        off = propagate(image, support, stepper, PropagationOptions()).probability
        between = np.moveaxis(on, axis, 0)[a + 1:b] != np.moveaxis(off, axis, 0)[a + 1:b]
        outside = [np.array_equal(np.take(on, z, axis), np.take(off, z, axis))
                   for z in range(truth.shape[axis]) if not a <= z <= b]
        assert bool(between.any()) == (plane == "coronal") and all(outside)
    session = PropagationSession()
    propagate(image, _painted_in(truth, axis, (a,)), stepper, options, session=session)
    again = propagate(image, support, stepper, options, session=session)
    assert np.array_equal(again.probability, on)
