"""The papers' few-shot protocol (FewShotProtocol/protocol.py, benchmarks/fewshot_protocol.py).

Each choice that makes our numbers comparable with the papers is pinned here: folds,
EP1/EP2 support slices and thirds, 3D Dice accumulation, the strict setting-2 exclusion,
and the one-command run (registration baseline, then a tiny trained model) with its
resume and its error messages. Real-scan tests skip without ../shared/data; sizes are
64 px and one thread so that each test stays well under a minute on 2 busy cores.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.evaluation import load_chaos_case
from FewShotSegLib.models import build_model
from FewShotSegLib.preprocessing import PreprocessConfig
from FewShotProtocol import protocol as P
from Training.episodes import EpisodeSampler, VolumeSlices, excluded_slices
from Training.train import build_sampler, load_config

CHAOS_IDS = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34",
             "36", "37", "38", "39"]
FAST = ["--threads", "1", "--size", "64", "--max-queries", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_protocol(tmp_path, *extra):
    from benchmarks.fewshot_protocol import main
    return main(["--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"),
                 "--cache-dir", str(tmp_path / "cache"), "--run-name", "t", *FAST, *extra])


# ----------------------------------------------------------------------------- folds
def test_folds_are_disjoint_cover_everything_and_take_the_support_outside():
    folds = P.make_folds(CHAOS_IDS)
    assert len(folds) == 5 and all(len(f.queries) == 4 for f in folds)
    queries = [q for f in folds for q in f.queries]
    assert sorted(queries, key=int) == CHAOS_IDS and len(set(queries)) == 20     # disjoint, cover all
    assert folds[0].queries == ["1", "2", "3", "5"]                              # consecutive sorted blocks
    for f in folds:
        assert f.support not in f.queries and f.support in f.train
        assert set(f.train) == set(CHAOS_IDS) - set(f.queries)                   # training: outside the fold
    assert len({f.support for f in folds}) == 5                                  # one support scan per fold
    assert P.make_folds(CHAOS_IDS) == folds                                      # deterministic
    assert [f.index for f in P.select_folds(folds, "3,1")] == [3, 1]
    for bad in ("5", "-1", "x"):
        with pytest.raises(FewShotSegError, match="fold|integers"):
            P.select_folds(folds, bad)
    with pytest.raises(FewShotSegError, match="at least 6 cases"):
        P.make_folds(CHAOS_IDS[:5])


# ----------------------------------------------------------------------------- supports and thirds
def test_ep1_support_slices_at_one_sixth_half_five_sixths(chaos_dir):
    _, label = load_chaos_case(chaos_dir.parent, "1")
    liver = P.class_slices(label, 1)
    assert liver[0] == 12 and liver[-1] == 35 and len(liver) == 24              # case 1's liver
    # 23 * 1/6 = 3.8 -> 4, 23 / 2 = 11.5 -> 12, 23 * 5/6 = 19.2 -> 19 (list positions)
    assert P.ep1_support_slices(label, 1) == [16, 24, 31]
    assert P.ep2_support_slice(label, 1) == 24
    for value in (1, 2, 3, 4):
        slices = P.class_slices(label, value)
        chosen = P.ep1_support_slices(label, value)
        assert all(np.any(label[z] == value) for z in chosen)                    # each holds the class
        thirds = [P.chunk_of(z, slices[0], slices[-1]) for z in chosen]
        assert thirds == [0, 1, 2]                                               # one per third
    with pytest.raises(FewShotSegError, match="no liver"):
        P.ep1_support_slices(np.zeros_like(label), 1)


def test_ep1_query_slices_use_the_support_of_their_third(chaos_dir):
    _, label = load_chaos_case(chaos_dir.parent, "2")
    assignment = P.ep1_assignment(label, 4)                                     # spleen: slices 13..23
    assert sorted(assignment) == list(range(13, 24))                            # the oracle z-range only
    parts = [assignment[z] for z in sorted(assignment)]
    assert parts == sorted(parts) and set(parts) == {0, 1, 2}
    assert [parts.count(p) for p in range(3)] == [4, 4, 3]                      # 11 slices in thirds
    assert [P.chunk_of(z, 10, 18) for z in range(10, 19)] == [0] * 3 + [1] * 3 + [2] * 3
    assert P.ep1_assignment(np.zeros_like(label), 4) == {}


# ----------------------------------------------------------------------------- Dice
def test_dice_sums_tp_fp_fn_over_the_scan_then_averages_scans_then_classes():
    truth = np.zeros((3, 4, 4), bool)
    pred = np.zeros_like(truth)
    truth[0, :2] = pred[0, :2] = True             # slice 0: 8 voxels found
    truth[1, 0, :2] = True                        # slice 1: 2 voxels missed
    pred[2, 3, :2] = True                         # slice 2: 2 false voxels
    counts = P.count(pred, truth)
    assert (counts.tp, counts.fp, counts.fn) == (8, 2, 2)
    assert counts.dice == pytest.approx(16 / 20)  # 3D, not the mean of per-slice Dice (1/3)
    inside = P.count(pred, truth, slices=[0, 1])  # EP1: only the scored slices count
    assert (inside.tp, inside.fp, inside.fn) == (8, 0, 2) and inside.dice == pytest.approx(16 / 18)
    assert P.Counts().dice == 1.0
    rows = [{"case": "a", "class": 1, "ep1": {"dice": 0.8}}, {"case": "b", "class": 1, "ep1": {"dice": 0.4}},
            {"case": "a", "class": 2, "ep1": {"dice": 1.0}}]
    summary = P.mean_dice(rows, "ep1")
    assert summary["per_class"] == {"liver": pytest.approx(0.6), "right_kidney": 1.0}
    assert summary["mean"] == pytest.approx(0.8) and summary["scans"] == 2       # not (0.8+0.4+1)/3
    assert P.mean_dice(rows + [{"case": "c", "class": 1, "ep1": {"dice": 0.5}, "ep1_post": {"dice": 0.9}}],
                       "ep1_post")["mean"] is None    # scored before the score existed: no partial mean


def test_ep2_post_processing_keeps_the_largest_component():
    mask = np.zeros((5, 8, 8), bool)
    mask[1:4, 1:5, 1:5] = True
    mask[2, 2, 2] = False                          # a hole
    mask[4, 7, 7] = True                           # a speck far away
    out = P.largest_component(mask)
    assert out[2, 2, 2] and not out[4, 7, 7] and out.sum() == 3 * 16


def test_intensity_gate_cuts_a_leak_of_other_tissue_and_never_adds():
    """Row +ig: a bright organ whose mask leaks into dark tissue through a bridge loses the
    leak; the statistics come from the confident voxels of the given slices only."""
    rng = np.random.default_rng(0)
    image = rng.normal(20, 5, (6, 32, 32)).astype(np.float32)          # dark surroundings
    organ = np.zeros(image.shape, bool)
    organ[1:5, 8:20, 8:20] = True
    image[organ] = rng.uniform(92, 108, organ.sum())                     # one tissue
    image[2, 12, 12] = 20                                               # a dark vessel inside: kept
    mask = organ.copy()
    mask[1:5, 14:16, 20:30] = True                                       # the leak, darker tissue
    probs = np.where(organ, 0.95, 0.0) + np.where(mask & ~organ, 0.6, 0.0)
    gated = P.gated_mask(mask, image, probs, 0)
    assert (gated == organ).all()
    assert (P.gated_mask(mask, image, np.zeros(image.shape), 0, core_probability=0) == organ).all()   # +igw
    from FewShotSegLib.postprocessing import intensity_gated
    assert not (intensity_gated(mask, image, probs) & ~mask).any()      # never adds a voxel
    # Statistics from slices without confident organ voxels: the whole mask there, a wider spread.
    loose = P.gated_mask(mask, image, np.zeros(image.shape), 0, slices=[1, 2])
    assert loose.sum() >= gated.sum()
    assert P.test_time_option("ss+ig").intensity_gate and not P.test_time_option("ss").intensity_gate
    assert P.test_time_option("igw").gate_whole_mask and not P.test_time_option("ig").gate_whole_mask
    with pytest.raises(FewShotSegError, match="one of ig, igw"):
        P.test_time_option("ig+igw")


# ----------------------------------------------------------------------------- setting 2
def test_strict_exclusion_drops_exactly_the_slices_with_the_class(chaos_dir, tmp_path):
    image_path, label_path = chaos_dir / "image_5.nii.gz", chaos_dir / "label_5.nii.gz"
    image, label = load_chaos_case(chaos_dir.parent, "5")
    kidneys = {int(z) for z in np.flatnonzero(np.isin(label, [2, 3]).any((1, 2)))}
    assert excluded_slices(label_path, image, 0, [2, 3]) == kidneys           # ANY of the classes
    assert excluded_slices(label_path, image, 0, [4]) == set(P.class_slices(label, 4).tolist())
    cache = tmp_path / "cache"
    vol = VolumeSlices(image_path, PreprocessConfig(size=64), "axial", cache, exclude_labels=(label_path, (2, 3)))
    full = VolumeSlices(image_path, PreprocessConfig(size=64), "axial", cache)
    kept = {i for i, _ in vol.valid}
    assert vol.excluded == kidneys and not kept & kidneys
    assert kept == {i for i, _ in full.valid} - kidneys                       # nothing else is lost
    edge = min(kidneys) - 1                                                   # adjacent episodes never
    mask = torch.ones(64, 64)                                                 # step into an excluded slice
    assert EpisodeSampler._adjacent(vol, edge, mask, +1)[0] == edge
    # the training config option: labels paired with the images by the numbers in their names
    config = {"name": "m", "model": "alpnet", "steps": 1, "out": str(tmp_path / "run"),
              "data": {"images": [str(image_path)], "preprocess": {"size": 64}, "cache_dir": str(cache),
                       "exclude_labels": {"labels": [str(chaos_dir / "label_*.nii.gz")], "values": [2, 3]}}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    sampler, _, _ = build_sampler(load_config(path, {}), rank=0)
    assert sampler.volumes[0].excluded == kidneys
    for bad, message in (({"labels": [str(chaos_dir / "label_1.nii.gz")], "values": [2]}, "no label file"),
                         ({"labels": [str(label_path)], "values": ["kidney"]}, "positive integers"),
                         ({"values": [2]}, "exclude_labels must be")):
        config["data"]["exclude_labels"] = bad
        path.write_text(json.dumps(config))
        with pytest.raises(FewShotSegError, match=message):
            build_sampler(load_config(path, {}), rank=0)


# ----------------------------------------------------------------------------- provenance
def test_checkpoints_trained_on_query_scans_are_flagged(tmp_path):
    from benchmarks.fewshot_protocol import trained_on_queries
    folder = tmp_path / "chaos_t2"
    folder.mkdir()
    for case in ("1", "2"):
        (folder / f"image_{case}.nii.gz").write_bytes(f"scan {case}".encode())
    import hashlib
    sha = hashlib.sha256(b"scan 2").hexdigest()
    assert trained_on_queries({"data": ["x/image_1.nii.gz"], "data_sha256": {"y": sha}}, tmp_path, ["1", "2"]) == ["2"]
    assert trained_on_queries({"data": ["elsewhere/image_1.nii.gz"]}, tmp_path, ["1", "2"]) == ["1"]
    assert trained_on_queries({}, tmp_path, ["1", "2"]) == []


# ----------------------------------------------------------------------------- one command
def test_registration_smoke_run_writes_table_resumes_and_keeps_results(chaos_dir, tmp_path, capsys):
    assert run_protocol(tmp_path, "--models", "registration", "--budget", "smoke") == 0
    results = tmp_path / "results"
    folds = sorted((results / "protocol" / "t" / "registration").glob("fold_0_s*.json"))
    assert [p.name for p in folds] == ["fold_0_s1.json", "fold_0_s2.json"]
    fold = json.loads(folds[0].read_text())
    assert fold["queries"] == ["1"] and fold["support"] == "8" and len(fold["rows"]) == 4
    assert fold["budget"] == "smoke" and fold["size"] == 64 and "threads" in fold["hardware"]
    assert fold["cpu_load"] is None or fold["cpu_load"] >= 0   # how busy the cores were (wall times)
    row = fold["rows"][0]
    assert row["organ"] == "liver" and 0 < row["ep1"]["dice"] <= 1 and row["query_range"] == [12, 35]
    summary = json.loads((results / "protocol_t.json").read_text())
    entry = summary["results"][0]
    assert entry["model"] == "registration" and set(entry["ep1"]["per_class"]) == set(P.CLASSES.values())
    assert summary["papers_mean_dice_percent"]["DFDT"] == {"s1": 84.31, "s2": 80.31}
    table = (results / "protocol_t.md").read_text()
    assert "| SSL-ALPNet (paper) | S1 |" in table and "78.84" in table and "**registration** (ours)" in table
    assert "STRICT" in table                                                  # the protocol travels with it
    for png in ("protocol_t.png", "protocol_t_examples.png"):
        assert (results / png).stat().st_size > 1000
    stamps = [p.stat().st_mtime_ns for p in folds]
    capsys.readouterr()
    assert run_protocol(tmp_path, "--models", "registration") == 0             # a rerun skips finished folds
    assert "done before, skipped" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in folds] == stamps
    # bad input: one line, exit 2, finished results kept
    for args, message in ((["--models", "unet"], "unknown model 'unet'"),
                          (["--folds", "7"], "fold index 7 out of range 0..4"),
                          (["--cases", "8"], "none is a query scan"),
                          (["--models", "registration", "--steps", "5", "--size", "96"], "size=64")):
        assert run_protocol(tmp_path, *args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fewshot_protocol: error: ") and message in err and "\n" not in err
    assert [p.stat().st_mtime_ns for p in folds] == stamps


def test_bad_data_folder_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty" / "chaos_t2").mkdir(parents=True)
    assert run_protocol(tmp_path, "--data", str(tmp_path / "empty"), "--models", "registration") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewshot_protocol: error: no image_N.nii.gz / label_N.nii.gz pairs")
    assert run_protocol(tmp_path, "--data", str(tmp_path / "absent")) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert run_protocol(tmp_path, "--models", "registration", "--test-time", "blend+bogus") == 2
    assert capsys.readouterr().err.strip().startswith("fewshot_protocol: error: unknown test-time option 'blend+bogus'")


def test_trained_model_setting2_smoke_run(chaos_dir, tmp_path, capsys):
    """Both setting-2 models train on the images outside the fold with their classes' slices
    removed, are scored on their own classes only, and are reused by a rerun."""
    assert run_protocol(tmp_path, "--models", "alpnet", "--settings", "2", "--steps", "1") == 0
    fold = json.loads((tmp_path / "results" / "protocol" / "t" / "alpnet" / "fold_0_s2.json").read_text())
    assert fold["compliant"] and [c["classes"] for c in fold["checkpoints"]] == [[1, 4], [2, 3]]
    assert sorted(r["class"] for r in fold["rows"]) == [1, 2, 3, 4] and fold["steps"] == 1
    config = json.loads((tmp_path / "work" / "alpnet" / "fold_0" / "s2_1-4" / "config.json").read_text())
    assert config["data"]["exclude_labels"]["values"] == [1, 4]
    assert not any(f"image_{q}.nii.gz" in p for q in fold["queries"] for p in config["data"]["images"])
    assert len(config["data"]["images"]) == 16
    capsys.readouterr()
    (tmp_path / "results" / "protocol" / "t" / "alpnet" / "fold_0_s2.json").unlink()
    assert run_protocol(tmp_path, "--models", "alpnet", "--settings", "2", "--steps", "1") == 0
    assert capsys.readouterr().out.count("trained model found") == 2          # no retraining


def test_ablation_variant_trains_with_its_options_and_rescore_needs_no_training(chaos_dir, tmp_path, capsys):
    """A variant row (seed 000's Table 2 'Base') trains crtpnet with its switches off, under
    its own name, beside the paper's ablation rows; --rescore scores it again with the saved
    model (EP1 + 3D post included) and never trains."""
    assert run_protocol(tmp_path, "--models", "crtpnet-base", "--settings", "1", "--steps", "1") == 0
    config = json.loads((tmp_path / "work" / "crtpnet-base" / "fold_0" / "s1" / "config.json").read_text())
    assert config["model"] == "crtpnet"
    assert config["model_config"]["cross_reference_attention"] is False
    assert config["model_config"]["cross_reference_mask"] is False
    path = tmp_path / "results" / "protocol" / "t" / "crtpnet-base" / "fold_0_s1.json"
    fold = json.loads(path.read_text())
    assert fold["model"] == "crtpnet-base" and any("Table 2 'Base'" in n for n in fold["notes"])
    assert all(0 <= r["ep1_post"]["dice"] <= 1 for r in fold["rows"])
    table = (tmp_path / "results" / "protocol_t.md").read_text()
    assert "| CRTPNet Base (paper, Table 2 of seed 000) | S1 |" in table and "78.93" in table
    assert "| EP1 + 3D post |" in table
    stamp = path.stat().st_mtime_ns
    capsys.readouterr()
    assert run_protocol(tmp_path, "--models", "crtpnet-base,registration", "--settings", "1",
                        "--steps", "1", "--rescore") == 0
    out = capsys.readouterr().out
    assert "scoring again with the trained model" in out and "trained model found" in out
    assert "training crtpnet" not in out and path.stat().st_mtime_ns != stamp
    (tmp_path / "work" / "crtpnet-base" / "fold_0" / "s1" / "model.pt").unlink()
    stamp = path.stat().st_mtime_ns
    assert run_protocol(tmp_path, "--models", "crtpnet-base", "--settings", "1", "--steps", "1", "--rescore") == 0
    assert "keeps its old scores" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp


def test_episode_variant_and_test_time_rows(chaos_dir, tmp_path):
    """An episode ablation row (same-slice queries only) trains the registered crtpnet with
    its training-data option over the base config's, and nothing else changes; test-time
    options score the same weights again under their own row names."""
    assert P.training_data_of("crtpnet") == {} and P.model_of("crtpnet-sameslice") == ("crtpnet", {})
    from benchmarks.fewshot_protocol import DEFAULT_CONFIG
    base = load_config(DEFAULT_CONFIG, {})
    assert base["data"]["adjacent_probability"] == 0.3                       # the default it ablates
    assert run_protocol(tmp_path, "--models", "crtpnet-sameslice,crtpnet-4x,crtpnet-bg02", "--settings", "1",
                        "--steps", "1", "--query-prototypes", "--support-refinement", "--area-threshold",
                        "--mirror-average", "--blend-supports", "--test-time", "blend+at,at,zs,ss,ig,igw") == 0
    config = json.loads((tmp_path / "work" / "crtpnet-sameslice" / "fold_0" / "s1" / "config.json").read_text())
    assert config["model"] == "crtpnet" and config["data"]["adjacent_probability"] == 0.0
    assert config["data"]["preprocess"]["size"] == 64 and len(config["data"]["images"]) == 16
    fold = json.loads((tmp_path / "results" / "protocol" / "t" / "crtpnet-sameslice" / "fold_0_s1.json").read_text())
    assert any("same-slice episodes only" in n for n in fold["notes"])
    folder = tmp_path / "results" / "protocol" / "t"
    for row, what in (("crtpnet-sameslice+qp", "query prototypes"), ("crtpnet-sameslice+sr", "20 Adam steps"),
                      ("crtpnet-sameslice+at", "query-adaptive threshold"),
                      ("crtpnet-sameslice+mirror", "left-right mirrored"),
                      ("crtpnet-sameslice+blend", "blended supports"),
                      ("crtpnet-sameslice+blend+at", "query-adaptive threshold"),
                      ("crtpnet-sameslice+zs", "slice smoothing"),
                      ("crtpnet-sameslice+ss", "query self-support"),
                      ("crtpnet-sameslice+ig", "intensity gate"),
                      ("crtpnet-sameslice+igw", "median intensity of the whole mask")):
        scored = json.loads((folder / row / "fold_0_s1.json").read_text())
        assert scored["model"] == row and scored["checkpoints"][0]["path"] == fold["checkpoints"][0]["path"]
        assert any(what in n for n in scored["notes"]) and any("same-slice" in n for n in scored["notes"])
        assert f"| **{row}** (ours) | S1 |" in (tmp_path / "results" / "protocol_t.md").read_text()
    assert P.family_of("crtpnet-sameslice+sr") == "crtpnet" and P.describe("alpnet") == "nothing: the model as registered"
    # Variant and test-time rows keep their fold figure in the work dir, out of the results
    # (committed: ~0.2 MB a fold) and out of the run's example figure; here every row is one.
    assert (tmp_path / "work" / "figures" / "crtpnet-sameslice+sr" / "fold_0_s1.png").stat().st_size > 1000
    assert not list(folder.glob("*/*.png"))
    assert not (tmp_path / "results" / "protocol_t_examples.png").exists()
    # The adaptive threshold changes EP1's binarisation only: one threshold per third, in range; EP2 as before.
    adaptive = json.loads((folder / "crtpnet-sameslice+at" / "fold_0_s1.json").read_text())
    assert [r["ep2"] for r in adaptive["rows"]] == [r["ep2"] for r in fold["rows"]]
    assert all(len(r["ep1_thresholds"]) == 3 and set(r["ep1_thresholds"]) <= set(P.AREA_THRESHOLDS)
               for r in adaptive["rows"])
    blended = json.loads((folder / "crtpnet-sameslice+blend" / "fold_0_s1.json").read_text())
    assert [r["ep2"] for r in blended["rows"]] == [r["ep2"] for r in fold["rows"]]
    both = json.loads((folder / "crtpnet-sameslice+blend+at" / "fold_0_s1.json").read_text())
    assert any("blended supports" in n for n in both["notes"]) and all("ep1_thresholds" in r for r in both["rows"])
    assert P.family_of("crtpnet-sameslice+blend+at") == "crtpnet"
    # A longer-training row trains its model steps_scale times the budget's steps, in the same table.
    longer = json.loads((tmp_path / "work" / "crtpnet-4x" / "fold_0" / "s1" / "config.json").read_text())
    assert longer["steps"] == 4 and P.steps_of("crtpnet", 1) == 1
    assert json.loads((folder / "crtpnet-4x" / "fold_0_s1.json").read_text())["steps"] == 4
    # A training-option row overrides the base config's top-level key and nothing else.
    weighted = json.loads((tmp_path / "work" / "crtpnet-bg02" / "fold_0" / "s1" / "config.json").read_text())
    assert weighted["class_weights"] == [0.2, 1.0] and "class_weights" not in config
    assert {k: v for k, v in weighted.items() if k not in ("class_weights", "out", "card")} == \
        {k: v for k, v in config.items() if k not in ("out", "card")} | {"data": weighted["data"]}


def test_blended_supports_weigh_the_nearest_thirds_by_position():
    """+blend: weights sum to 1, the slice's own third always weighs most, a slice at a
    third's centre (where its support stands) and the outer ends use one support only, and
    the weight moves linearly across a border."""
    for lo, hi in ((10, 27), (3, 6), (0, 1), (5, 5), (0, 40)):
        label = np.zeros((50, 4, 4), np.uint8)
        label[lo:hi + 1, 1, 1] = 1
        assignment = P.ep1_assignment(label, 1)
        weights = P.ep1_support_weights(assignment)
        assert sorted(weights) == list(range(lo, hi + 1))
        for z, w in weights.items():
            own = assignment[z]
            assert sum(w.values()) == pytest.approx(1.0) and set(w) <= {own - 1, own, own + 1}
            assert w[own] >= 0.5 and len(w) <= 2
        assert weights[lo] == {assignment[lo]: 1.0} and weights[hi] == {assignment[hi]: 1.0}
    weights = P.ep1_support_weights(P.ep1_assignment(np.pad(np.ones((18, 1, 1), np.uint8), ((10, 0), (0, 0), (0, 0))), 1))
    # Thirds of 6 slices: 10..15, 16..21, 22..27, centres 12.5, 18.5, 24.5.
    assert weights[12] == {0: 1.0} and weights[13] == pytest.approx({0: 11 / 12, 1: 1 / 12})
    assert weights[15] == pytest.approx({0: 7 / 12, 1: 5 / 12}) and weights[16] == pytest.approx({1: 7 / 12, 0: 5 / 12})
    assert weights[21] == pytest.approx({1: 7 / 12, 2: 5 / 12}) and weights[25] == {2: 1.0}
    assert P.ep1_support_weights({}) == {}


def test_slice_smoothing_averages_scored_neighbours_only():
    """+zs: a one-slice spike spreads to its scored neighbours by the kernel; the range's end
    slices renormalise over the neighbours they have; slices outside the scored range stay
    as they were."""
    probs = torch.zeros((8, 2, 2))
    probs[3] = 1.0
    probs[0] = 0.7   # outside the scored range 2..5: must neither change nor leak in
    kernel = {-1: 0.25, 0: 0.5, 1: 0.25}
    out = P.smooth_across_slices(probs, range(2, 6), kernel)
    assert out[3].tolist() == [[0.5, 0.5], [0.5, 0.5]] and out[4].tolist() == [[0.25, 0.25], [0.25, 0.25]]
    assert out[2] == pytest.approx(torch.full((2, 2), 0.25 / 0.75))   # end slice: 1/4 of 3 over 3/4
    assert out[0].tolist() == probs[0].tolist() and out[1].sum() == 0 and out[5].sum() == 0
    wide = P.smooth_across_slices(probs, range(0, 8))   # the default: 1,2,3,2,1 over 9
    assert sum(P.SLICE_KERNEL.values()) == pytest.approx(1.0)
    assert wide[5] == pytest.approx(torch.full((2, 2), 1 / 9)) and wide[6].sum() == 0
    assert probs[3].sum() == 4   # the input is not modified
    assert P.smooth_across_slices(probs, [3]) is probs
    assert P.test_time_option("blend+zs").smoothed and not P.test_time_option("blend").smoothed


def test_test_time_options_combine_with_plus():
    combined = P.test_time_option("blend+mirror+qp")
    assert combined.blended and combined.mirrored and not combined.area_threshold
    assert combined.model_options == {"query_prototypes": True} and "blended supports" in combined.what
    assert P.test_time_option("at") is P.TEST_TIME["at"] and P.known_test_time("nope") is None
    assert P.test_time_option("ss+tune+ir").tuning_remap and not P.test_time_option("tune").tuning_remap
    for bad in ("", "at+at", "qp+sr", "blend+", "ss+ir"):
        with pytest.raises(FewShotSegError, match="test-time option"):
            P.test_time_option(bad)
    assert "left-right mirrored" in P.describe("dfdt-4x+blend+mirror") and "4x" in P.describe("dfdt-4x+blend+mirror")


def test_area_matched_threshold_follows_the_support_area():
    """The query-adaptive threshold picks the candidate whose mean organ area per slice is
    nearest the support slice's, in mm^2 of each scan's own pixels, within 0.4..0.7."""
    import SimpleITK as sitk
    yy, xx = np.mgrid[:40, :40]
    radius = np.hypot(yy - 20, xx - 20)
    probs = np.stack([np.clip(1 - radius / 20, 0, 1)] * 3)      # 0.6 at radius 8, 0.4 at radius 12
    pixel = 0.5
    area_at = {t: np.count_nonzero(probs[0] >= t) * pixel for t in P.AREA_THRESHOLDS}
    assert P.area_matched_threshold(probs, pixel, area_at[0.6]) == 0.6
    assert P.area_matched_threshold(probs, pixel, area_at[0.45] + 1) == 0.45
    assert P.area_matched_threshold(probs, pixel, 1e6) == 0.4 and P.area_matched_threshold(probs, pixel, 0) == 0.7
    image = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    image.SetSpacing((0.5, 0.7, 3.0))
    assert P.pixel_area(image, 0) == pytest.approx(0.35) and P.pixel_area(image, 2) == pytest.approx(2.1)


def test_mirror_average_is_exactly_mirror_equivariant():
    """+mirror averages an episode with its left-right mirror (mirrored back): mirroring
    the whole episode mirrors the answer, which the network alone does not do."""
    torch.manual_seed(0)
    net = P.ModelPredictor(build_model("alpnet", backbone="effnet-lite0", pretrained=False),
                           PreprocessConfig(size=64))
    averaged = P.MirrorAveragePredictor(net)
    images = torch.rand(3, 64, 64)
    mask = torch.zeros(64, 64)
    mask[20:40, 10:30] = 1

    def run(predictor, imgs, support_mask):
        feats = predictor.prepare(imgs)
        return predictor.predict(feats[0], support_mask, feats[1:])

    plain, mirrored_episode = run(averaged, images, mask), run(averaged, images.flip(-1), mask.flip(-1))
    assert plain.shape == (2, 64, 64) and torch.allclose(mirrored_episode, plain.flip(-1), atol=1e-5)
    assert not torch.allclose(run(net, images.flip(-1), mask.flip(-1)), run(net, images, mask).flip(-1), atol=1e-3)
    expected = (run(net, images, mask) + run(net, images.flip(-1), mask.flip(-1)).flip(-1)) / 2
    assert torch.allclose(plain, expected, atol=1e-6)


def test_multi_scale_averages_the_episode_over_grid_sizes():
    """+ms runs the whole episode (support, its mask, queries) at each scale of the grid and
    averages the probabilities resampled back; at scale 1 alone it is the member itself.
    It wraps a mirrored predictor too (its features are kept per scale)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    net = P.ModelPredictor(build_model("alpnet", backbone="effnet-lite0", pretrained=False),
                           PreprocessConfig(size=64))
    images = torch.rand(3, 64, 64)
    mask = torch.zeros(64, 64)
    mask[20:40, 10:30] = 1

    def run(predictor, imgs, support_mask):
        feats = predictor.prepare(imgs)
        return predictor.predict(feats[0], support_mask, feats[[1, 2]])

    def resized(x, side):
        return F.interpolate(x[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]

    assert torch.allclose(run(P.MultiScalePredictor(net, (1.0,)), images, mask), run(net, images, mask))
    two = run(P.MultiScalePredictor(net, (1.0, 1.5)), images, mask)
    enlarged = resized(run(net, resized(images, 96), resized(mask[None], 96)[0]), 64)
    assert two.shape == (2, 64, 64) and torch.allclose(two, (run(net, images, mask) + enlarged) / 2, atol=1e-6)
    mirrored = run(P.MultiScalePredictor(P.MirrorAveragePredictor(net), (1.0, 1.5)), images, mask)
    assert mirrored.shape == (2, 64, 64) and not torch.allclose(mirrored, two, atol=1e-4)
    assert mask.sum() == 400   # the support mask is not modified
    for bad in ((), (0.0, 1.0)):
        with pytest.raises(FewShotSegError, match="multi-scale"):
            P.MultiScalePredictor(net, bad)
    assert P.test_time_option("blend+ms").multiscale and "1 and 1.5 times the grid" in P.describe("crtpnet+ms")
    zoomed = P.test_time_option("blend+ms+sz")
    assert zoomed.support_zoom and zoomed.multiscale and not P.test_time_option("ms").support_zoom
    assert "zoomed by 1.12 and 1.25 about the organ's centre" in P.describe("crtpnet+sz")


def test_fold_notes_merge_without_losing_a_shared_note():
    """A note every fold shares stays whole in the table (its parenthesis included); notes
    that differ only in their parenthesis (each fold's scans) become the common text."""
    from FewShotProtocol.report import _merge_notes
    shared = "crtpnet variant: episode loss weights 0.2 : 1 (SSL-ALPNet's 0.05 : 1 over-segments)"
    per_fold = ["not protocol-compliant: trained on all scans (query scans 1,2)",
                "not protocol-compliant: trained on all scans (query scans 8,10)"]
    assert _merge_notes([shared, per_fold[0], shared, per_fold[1]]) == \
        [shared, "not protocol-compliant: trained on all scans"]
    assert _merge_notes([per_fold[0]]) == per_fold[:1]


def test_cpu_load_is_shown_beside_the_hardware_when_folds_recorded_it():
    from FewShotProtocol.report import _load_range
    folds = [{"device": "cpu", "cpu_load": 2.46}, {"device": "cpu", "cpu_load": 3.1}]
    assert _load_range(folds) == "1-min load up to 3.1"
    assert _load_range(folds + [{"device": "cpu"}]) == "1-min load up to 3.1 (2 of 3 folds recorded)"
    assert _load_range([{"device": "cuda", "cpu_load": 5.0}, {"device": "cpu"}]) is None


def test_variants_compare_with_their_model_on_shared_folds_only():
    from FewShotProtocol import report as R

    def fold(model, k, dice):
        rows = [{"case": f"{k}{c}", "class": c, **{key: {"dice": dice} for key in P.SCORES}} for c in P.CLASSES]
        return {"model": model, "setting": "s1", "fold": k, "rows": rows, "budget": "cpu", "steps": 3000,
                "size": 256}

    results = [fold("crtpnet", k, 0.5 + 0.1 * k) for k in range(5)] + [fold("crtpnet-base", 0, 0.9)]
    summary = R.summarise(results)
    (table,) = summary["same_folds"]
    assert table["folds"] == [0] and [r["model"] for r in table["rows"]] == ["crtpnet-base", "crtpnet"]
    assert table["rows"][1]["ep1"] == pytest.approx(0.5)          # crtpnet on fold 0 only, not 0.7
    assert table["rows"][1]["paper"] == ("CRTPNet Base + Mask + Transformer", 79.49)
    md = R.markdown(summary, "t", "doc")
    assert "Variants of `crtpnet` on the folds they share (S1, folds 0" in md and "| crtpnet-base |" in md
    assert R.summarise(results[:5])["same_folds"] == []             # no variant, no extra table
    results += [fold("crtpnet+sr", k, 0.2) for k in range(5)]      # all folds: a table of its own, first
    full, first = R.summarise(results)["same_folds"]
    assert full["folds"] == [0, 1, 2, 3, 4] and [r["model"] for r in full["rows"]] == ["crtpnet+sr", "crtpnet"]
    assert full["rows"][1]["ep1"] == pytest.approx(0.7) and first == table
    s2 = [{**fold("crtpnet", 0, 0.4), "setting": "s2"}, {**fold("crtpnet+sr", 0, 0.3), "setting": "s2"}]
    (s2_table,) = [t for t in R.summarise(results + s2)["same_folds"] if t["setting"] == "s2"]
    assert [r["paper"] for r in s2_table["rows"]] == [None, None]   # Table 2 of seed 000 is setting 1


def test_binarisation_study_rescores_the_protocol_predictions(chaos_dir, tmp_path):
    """The study's rules binarise the protocol's own EP1 probabilities: its 'fixed 0.5',
    'area per third', 'largest component' and row +ig's gate give exactly the protocol
    rows' EP1 (plain, +at, + 3D post, +ig); an
    ensemble of a model with itself changes nothing; a missing fold model is one line."""
    from benchmarks.binarisation_study import RULES, main as study
    assert run_protocol(tmp_path, "--models", "alpnet", "--settings", "1", "--steps", "1", "--area-threshold",
                        "--test-time", "ig") == 0
    folder = tmp_path / "results" / "protocol" / "t"
    plain = json.loads((folder / "alpnet" / "fold_0_s1.json").read_text())["mean_dice"]["ep1"]
    post = json.loads((folder / "alpnet" / "fold_0_s1.json").read_text())["mean_dice"]["ep1_post"]
    gated = json.loads((folder / "alpnet+ig" / "fold_0_s1.json").read_text())["mean_dice"]["ep1"]
    adaptive = json.loads((folder / "alpnet+at" / "fold_0_s1.json").read_text())["mean_dice"]["ep1"]
    common = ["--work-dir", str(tmp_path / "work"), "--folds", "0", "--max-queries", "1"]
    assert study(["--models", "alpnet", "--out", str(tmp_path / "one.json"), *common]) == 0
    rules = json.loads((tmp_path / "one.json").read_text())["rules"]
    assert set(rules) == set(RULES) and all(0 <= r["mean"] <= 100 for r in rules.values())
    assert rules["fixed 0.5"]["mean"] == pytest.approx(100 * plain, abs=0.006)
    assert rules["area per third"]["mean"] == pytest.approx(100 * adaptive, abs=0.006)
    assert rules["largest component"]["mean"] == pytest.approx(100 * post, abs=0.006)
    assert rules["intensity gate 3 SD, core 0.8"]["mean"] == pytest.approx(100 * gated, abs=0.006)
    assert study(["--models", "alpnet,alpnet", "--out", str(tmp_path / "two.json"), *common]) == 0
    twice = json.loads((tmp_path / "two.json").read_text())["rules"]
    assert twice["fixed 0.5"]["mean"] == pytest.approx(rules["fixed 0.5"]["mean"], abs=0.01)
    assert study(["--models", "crtpnet", "--out", str(tmp_path / "none.json"), *common]) == 2
    assert not (tmp_path / "none.json").exists()
    assert study(["--models", "alpnet", "--max-queries", "0", "--out", str(tmp_path / "none.json")]) == 2
    with pytest.raises(FewShotSegError, match="share one pre-processing"):
        P.EnsemblePredictor([])


@pytest.mark.parametrize("row", sorted(P.VARIANTS))
def test_every_variant_builds_and_names_known_training_keys(row):
    """A typo in a variant (an option the model does not take, a training key train.py
    does not know) fails here, not an hour into a fold's training."""
    from Training.train import DATA_DEFAULTS, DEFAULTS
    variant = P.VARIANTS[row]
    model, options = P.model_of(row)
    assert model == variant.model and options == variant.options
    built = build_model(model, backbone="effnet-lite0", pretrained=False, **options)
    assert all(built.config[key] == value for key, value in options.items())
    assert set(variant.training_data) <= set(DATA_DEFAULTS) and set(variant.training) <= set(DEFAULTS)
    assert variant.steps_scale >= 1 and P.steps_of(row, 1000) == 1000 * variant.steps_scale
    from FewShotSegLib.augmentation import AugmentConfig
    AugmentConfig(**variant.training.get("augment", {}))   # augment keys are its fields
