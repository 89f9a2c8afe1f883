"""The papers' few-shot protocol on CHAOS-T2, in one place (folds, supports, scoring).

Our numbers only compare with SSL-ALPNet / CRTPNet / DFDT when every choice below matches
theirs, so the choices live here, once, for the benchmark script and the tests. Where the
papers leave a choice open, ours is written down here (docs/REFERENCE.md section 1):

* 1-way 1-shot, 5-fold cross-validation. The case ids, sorted numerically, are cut into
  5 consecutive blocks (SSL-ALPNet's ``_SEP`` split): fold k = ids[4k:4k+4] = the 4 query
  scans.
* Support scan: the first scan of the NEXT fold (fold (k+1) mod 5). It lies outside the
  fold (REFERENCE: "one support scan taken from outside the fold"), is fixed per fold,
  and differs between folds. Its label is the only label a test reads.
* Training: the images (never the labels) of every scan outside the fold, the support
  scan's included (it is outside the fold; only its label is used, at test time).
* EP1 (the papers' standard): the support scan's slices that contain the class, in
  order; the ones at 1/6, 1/2, 5/6 of that list are the 3 support slices. Only query
  slices inside the query's ground-truth z-range (first to last slice with the class)
  are scored, an oracle; the range is cut into thirds and each third uses its support.
* EP2 (realistic): one support slice (the middle one of the class in the support scan)
  against EVERY query slice, direct per-slice segmentation, no oracle range. Reported
  raw (as the papers) and, as a documented option, with 3D post-processing: the
  largest 26-connected component with holes filled per slice (the engine's clean-up,
  which otherwise needs painted seeds that a cross-scan support cannot give). EP1 is also
  reported with the same post-processing of its predictions (inside the scored range):
  our option, never mixed into the papers' EP1 column.
* Dice: TP/FP/FN summed over the scored slices of a scan (3D), mean over scans, then
  mean over classes. The model's probabilities go back to the scan's own grid first.
* Setting 1: training ignores the classes (they may appear as superpixels).
* Setting 2, STRICT rule (SSL-ALPNet): a training slice is dropped when ANY test class
  is present in it (the lenient ALL rule of RPT/Q-Net/DFDT removes almost nothing). The
  test classes come in SSL-ALPNet's two groups for CHAOS-T2, upper abdomen {liver,
  spleen} and lower abdomen {right kidney, left kidney}: per fold one model is trained
  for each group and scored on that group's classes only. Excluding all four classes
  at once would leave too few slices; one group per class would be a third protocol.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.evaluation import CHAOS_ORGANS, chaos_cases, load_chaos_case
from FewShotSegLib.imageio import array_axis_for
from FewShotSegLib.postprocessing import GATE_CORE_PROBABILITY, GATE_ROBUST_SDS, fill_holes_per_slice, intensity_gated
from FewShotSegLib.preprocessing import prepare_volume
from .options import (SLICE_KERNEL, SUPPORT_TUNING, TEST_TIME, TUNING_REMAP, TestTime,  # noqa: F401
                               known_test_time, test_time_option)
from .self_support import predicted_extent, self_supported
from .thirds import PARTS, chunk_of, ep1_support_weights  # noqa: F401 (P.chunk_of, ...)

N_FOLDS = 5
CLASSES = {v: k for k, v in CHAOS_ORGANS.items()}    # 1 liver, 2 right_kidney, ...
S2_GROUPS = ((1, 4), (2, 3))                # SSL-ALPNet LABEL_GROUP for CHAOS-T2
THRESHOLD = 0.5
SCORES = ("ep1", "ep1_post", "ep2", "ep2_post")     # what each (scan, class) row holds
# Mean Dice (%) the papers report on abdominal MRI, setting 1 / setting 2 (EP1).
PAPERS = {"SSL-ALPNet": (78.84, 73.02), "CRTPNet": (79.49, 75.08), "Q-Net": (81.02, 68.59),
          "RPT": (82.44, 79.04), "GMRD": (82.90, 79.70), "DFDT": (84.31, 80.31),
          "FoB+SAM (R101 + SAM ViT-H)": (84.46, 80.46)}
# Seed 000's ablation (its Table 2, setting 1, EP1 mean Dice %), keyed by our row for it.
PAPER_ABLATION = {"crtpnet-base": ("CRTPNet Base", 78.93),
                  "crtpnet-mask": ("CRTPNet Base + Support Mask", 79.14),
                  "crtpnet": ("CRTPNet Base + Mask + Transformer", 79.49)}
# Protocol rows that are a registered model trained with other options: seed 000's
# ablation rows and the improvements REFERENCE section 2 names. Each trains and scores like
# any model, under its own name.
@dataclass(frozen=True)
class Variant:
    """A protocol row = a registered model + model options + training-data options
    + training options (+ a multiple of the budget's training steps)."""
    model: str
    options: dict
    what: str
    training_data: dict = field(default_factory=dict)   # keys of Training/train.py "data"
    steps_scale: int = 1
    training: dict = field(default_factory=dict)        # other top-level Training/train.py keys


VARIANTS = {
    "crtpnet-base": Variant("crtpnet", {"cross_reference_mask": False, "cross_reference_attention": False},
                            "Table 2 'Base': cross-reference gates without support mask or transformer"),
    "crtpnet-mask": Variant("crtpnet", {"cross_reference_attention": False},
                            "Table 2 'Base + Support Mask': masked support, no transformer"),
    "crtpnet-sameslice": Variant("crtpnet", {}, "same-slice episodes only (SSL-ALPNet's; ours: 30 % of "
                                 "queries on the adjacent slice)", {"adjacent_probability": 0.0}),
    "crtpnet-adjacent70": Variant("crtpnet", {}, "70 % of episode queries on the adjacent slice (ours: 30 %)",
                                  {"adjacent_probability": 0.7}),
    "alpnet-soft": Variant("alpnet", {"soft_local": True}, "coverage-weighted local prototypes"),
    "alpnet-softfg": Variant("alpnet", {"soft_local": True, "soft_local_background": False},
                             "coverage-weighted local prototypes for the foreground only"),
    "alpnet-os4": Variant("alpnet", {"output_stride": 4}, "64x64 features: output stride 4"),
    "crtpnet-4x": Variant("crtpnet", {}, "4x the budget's training steps (does the budget limit it?)",
                          steps_scale=4),
    "crtpnet-8x": Variant("crtpnet", {}, "8x the budget's training steps (do steps still help past 4x?)",
                          steps_scale=8),
    "crtpnet-ft": Variant("crtpnet", {}, "the whole backbone trained (the CPU budget freezes its first 5 "
                          "blocks, the stride-8 features among them, for speed)",
                          training={"freeze_backbone_blocks": 0}),
    "crtpnet-4x-ft": Variant("crtpnet", {}, "4x the budget's training steps with the whole backbone trained "
                             "(do the two levers add up?)", steps_scale=4, training={"freeze_backbone_blocks": 0}),
    "dfdt-4x": Variant("dfdt", {}, "4x the budget's training steps (does DFDT gain more from them than crtpnet?)",
                       steps_scale=4),
    "crtpnet-bg02": Variant("crtpnet", {}, "episode loss weights background 0.2 : foreground 1 (SSL-ALPNet's "
                            "0.05 : 1 pushes towards over-segmentation)", training={"class_weights": [0.2, 1.0]}),
    "crtpnet-cos": Variant("crtpnet", {}, "cosine learning rate to 0 over the budget (SSL-ALPNet's x0.95 "
                           "per 1000 steps hardly decays in a short budget)", training={"lr_schedule": "cosine"}),
    "crtpnet-cos3": Variant("crtpnet", {}, "cosine learning rate from 3x the rate (3e-3) to 0 over the budget",
                            training={"lr_schedule": "cosine", "lr": 3e-3}),
    "crtpnet-ir": Variant("crtpnet", {}, "each episode image (support and query on their own) also, with "
                          "probability 0.5, through a random non-monotonic intensity curve (an organ's brightness "
                          "differs between scans: CHAOS-T2 case 15's spleen is as dark as its liver, case 19's "
                          "twice as bright)", training={"augment": {"intensity_remap": 0.5}}),
}


def model_of(row: str) -> tuple[str, dict]:
    """A row name -> (registered model, its options): ``alpnet`` -> ('alpnet', {})."""
    variant = VARIANTS.get(row)
    return (variant.model, dict(variant.options)) if variant else (row, {})


def steps_of(row: str, budget_steps: int) -> int:
    """Training steps of a row: the budget's, times its variant's ``steps_scale``."""
    variant = VARIANTS.get(row)
    return budget_steps * (variant.steps_scale if variant else 1)


def training_of(row: str) -> dict:
    """A row's top-level training options over the base config's (``{}`` for a plain model)."""
    variant = VARIANTS.get(row)
    return dict(variant.training) if variant else {}


def training_data_of(row: str) -> dict:
    """A row's training-data options over the base config's (``{}`` for a plain model)."""
    variant = VARIANTS.get(row)
    return dict(variant.training_data) if variant else {}


def family_of(row: str) -> str:
    """The registered model a row varies: ``crtpnet-mask+qp`` -> ``crtpnet``."""
    name = row.partition("+")[0]
    return VARIANTS[name].model if name in VARIANTS else name


def describe(row: str) -> str:
    """What a row changes against its registered model, in words."""
    name, _, key = row.partition("+")
    option = known_test_time(key)
    parts = ([VARIANTS[name].what] if name in VARIANTS else []) + ([option.what] if option else [])
    return "; ".join(parts) or "nothing: the model as registered"


# Run sizes. full: the hour on one GPU. SSL-ALPNet trains 100k steps per model; on
# one H200 the 15 models (5 folds x setting 1 + two setting-2 groups) trained at once at
# 0.13 s per step each, ~117 steps/s together (measured 2026-12-04, one episode worker
# each; GPU and cores both full), so 15 x 20000 steps take ~43 min. cpu: every fold on a
# 2-core CPU at 3000 steps (18-22 min per model, one thread per process, one process per
# core). smoke: proves the pipeline on a 2-core CPU in minutes.
BUDGETS = {
    "full": {"steps": 20000, "size": 256, "folds": "0,1,2,3,4", "max_queries": None},
    "cpu": {"steps": 3000, "size": 256, "folds": "0,1,2,3,4", "max_queries": None},
    "smoke": {"steps": 20, "size": 128, "folds": "0", "max_queries": None},
}


# ----------------------------------------------------------------------------- data and folds
def data_folder(data: str | Path | None) -> Path:
    """``--data``: the shared data folder (holding chaos_t2/), or the chaos_t2 folder itself;
    default ``../shared/data`` or $FEWSHOTSEG_DATA. Returns the folder holding chaos_t2/."""
    from FewShotSegLib.evaluation import shared_data_dir
    base = shared_data_dir(data)
    return base.parent if base.name == "chaos_t2" and not (base / "chaos_t2").is_dir() else base


def protocol_cases(data_dir: Path) -> list[str]:
    """The case ids with an image_N / label_N pair, sorted numerically."""
    return chaos_cases(Path(data_dir))


@dataclass
class Fold:
    index: int
    queries: list            # the 4 query scans
    support: str             # the support scan (outside the fold)
    train: list              # images for self-supervised training (everything outside the fold)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def make_folds(cases: list[str], n_folds: int = N_FOLDS) -> list[Fold]:
    """Consecutive blocks of the sorted ids; support = first scan of the next block."""
    if len(cases) < n_folds + 1:
        raise FewShotSegError(f"{n_folds}-fold cross-validation needs at least {n_folds + 1} cases, "
                              f"found {len(cases)}")
    blocks = [list(b) for b in np.array_split(np.asarray(cases, dtype=object), n_folds)]
    folds = []
    for k, block in enumerate(blocks):
        support = blocks[(k + 1) % n_folds][0]
        folds.append(Fold(k, [str(c) for c in block], str(support), [str(c) for c in cases if c not in block]))
    return folds


def select_folds(folds: list[Fold], spec) -> list[Fold]:
    """``"0,2"`` or a list of ints -> those folds; an index outside 0..n-1 is an error."""
    if isinstance(spec, str):
        try:
            spec = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise FewShotSegError(f"--folds must be comma-separated integers, not '{spec}'") from None
    bad = [k for k in spec if not 0 <= k < len(folds)]
    if bad or not spec:
        raise FewShotSegError(f"fold index {bad[0] if bad else '(none)'} out of range 0..{len(folds) - 1}")
    return [folds[k] for k in dict.fromkeys(spec)]


# ----------------------------------------------------------------------------- support slices
def class_slices(label: np.ndarray, value: int, axis_index: int = 0) -> np.ndarray:
    """Sorted indices of the slices along ``axis_index`` that contain label ``value``."""
    other = tuple(a for a in range(3) if a != axis_index)
    return np.flatnonzero(np.any(np.asarray(label) == value, axis=other))


def _at_fractions(slices: np.ndarray, fractions) -> list[int]:
    """Elements of ``slices`` at the given fractions of the list (rounded half up)."""
    last = len(slices) - 1
    return [int(slices[int(np.floor(last * f + 0.5))]) for f in fractions]


def ep1_support_slices(label: np.ndarray, value: int, axis_index: int = 0, parts: int = PARTS) -> list[int]:
    """The support slices at 1/6, 1/2, 5/6 of the class's slices (one per third)."""
    slices = class_slices(label, value, axis_index)
    if slices.size == 0:
        raise FewShotSegError(f"the support scan has no {CLASSES.get(value, value)} (label {value})")
    return _at_fractions(slices, [(2 * p + 1) / (2 * parts) for p in range(parts)])


def ep2_support_slice(label: np.ndarray, value: int, axis_index: int = 0) -> int:
    """The middle slice of the class in the support scan."""
    slices = class_slices(label, value, axis_index)
    if slices.size == 0:
        raise FewShotSegError(f"the support scan has no {CLASSES.get(value, value)} (label {value})")
    return _at_fractions(slices, [0.5])[0]


def ep1_assignment(label: np.ndarray, value: int, axis_index: int = 0, parts: int = PARTS) -> dict:
    """{query slice: support index 0..parts-1} over the query's ground-truth z-range."""
    slices = class_slices(label, value, axis_index)
    if slices.size == 0:
        return {}
    lo, hi = int(slices[0]), int(slices[-1])
    return {z: chunk_of(z, lo, hi, parts) for z in range(lo, hi + 1)}


def smooth_across_slices(probs: torch.Tensor, slices, kernel: dict = SLICE_KERNEL) -> torch.Tensor:
    """``probs`` [slices, H, W] with each of ``slices`` averaged with its scored neighbours
    (``kernel``: {offset: weight}, renormalised where a neighbour is not scored); other
    slices as they were.

    Why: every query slice is predicted on its own, so an organ's probability flickers from
    slice to slice where the anatomy changes slowly; the neighbours are a free second
    opinion. Only scored slices take part, so no prediction leaks from outside EP1's range.
    The width was chosen on the shipped checkpoint (not on the fold models): over 3 / 5 / 7
    slices it scored EP1 75.3 / 75.6 / 75.4 on its folds 0-2 (unsmoothed 74.3)."""
    idx = sorted(int(z) for z in slices)
    if len(idx) < 2:
        return probs
    out = probs.clone()
    scored = set(idx)
    for z in idx:
        near = [(z + d, w) for d, w in kernel.items() if z + d in scored]
        out[z] = sum(w * probs[k] for k, w in near) / sum(w for _, w in near)
    return out


# ----------------------------------------------------------------------------- scoring
@dataclass
class Counts:
    """TP/FP/FN voxels of one scan and class, summed over the scored slices (3D Dice)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def dice(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2 * self.tp / denom

    def to_dict(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "dice": self.dice}


def count(pred: np.ndarray, truth: np.ndarray, slices=None, axis_index: int = 0) -> Counts:
    """Voxel counts over the whole scan, or only over ``slices`` along ``axis_index``."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if slices is not None:
        idx = np.asarray(list(slices), dtype=np.int64)
        pred, truth = np.take(pred, idx, axis=axis_index), np.take(truth, idx, axis=axis_index)
    tp = int(np.count_nonzero(pred & truth))
    return Counts(tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp)


def mean_dice(rows: list[dict], key: str) -> dict:
    """{'per_class': {organ: mean over scans}, 'mean': mean over classes, 'scans': n}."""
    per_class = {}
    if any(key not in r for r in rows):  # scored before this score existed: no partial mean
        rows = []
    for value, organ in CLASSES.items():
        scores = [r[key]["dice"] for r in rows if r["class"] == value and r.get(key)]
        if scores:
            per_class[organ] = float(np.mean(scores))
    scans = len({r["case"] for r in rows})
    return {"per_class": per_class, "mean": float(np.mean(list(per_class.values()))) if per_class else None,
            "scans": scans}


def largest_component(mask: np.ndarray, axis_index: int = 0) -> np.ndarray:
    """The optional 3D post-processing (EP2, and EP1 as our option): the largest
    26-connected component, holes filled."""
    labels, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return fill_holes_per_slice(labels == (int(np.argmax(sizes)) + 1), axis_index)


def gated_mask(mask: np.ndarray, image: np.ndarray, probs: np.ndarray, axis_index: int, slices=None,
               core_probability: float = GATE_CORE_PROBABILITY, robust_sds: float = GATE_ROBUST_SDS) -> np.ndarray:
    """Rows +ig / +igw: `intensity_gated` (statistics from ``slices`` along the axis when
    given: EP1's scored ones; +igw: ``core_probability`` 0, the whole mask), then
    `largest_component` (the gate can cut a leak's bridge)."""
    within = None
    if slices is not None:
        within = np.zeros(mask.shape, bool)
        index = [slice(None)] * mask.ndim
        index[axis_index] = list(slices)
        within[tuple(index)] = True
    return largest_component(intensity_gated(mask, image, probs, core_probability, robust_sds, within=within),
                             axis_index)


AREA_THRESHOLDS = np.round(np.arange(0.4, 0.7001, 0.05), 2)   # the query-adaptive threshold's choices


def pixel_area(image: sitk.Image, axis_index: int) -> float:
    """mm^2 of one pixel of a slice across array axis ``axis_index`` (arrays are k, j, i)."""
    spacing = image.GetSpacing()[::-1]
    return float(np.prod([spacing[a] for a in range(3) if a != axis_index]))


def support_area(image: sitk.Image, label: np.ndarray, value: int, z: int, axis_index: int) -> float:
    """mm^2 of class ``value`` on slice ``z`` of a labelled scan (the area a support shows)."""
    return np.count_nonzero(np.take(label == value, z, axis=axis_index)) * pixel_area(image, axis_index)


def thresholded(volume: np.ndarray, axis_index: int, parts) -> np.ndarray:
    """``volume >= t`` on the slices ``zs`` of each ``(zs, t)`` in ``parts``; elsewhere False."""
    out = np.zeros(volume.shape, bool)
    for zs, t in parts:
        index = [slice(None)] * 3
        index[axis_index] = list(zs)
        out[tuple(index)] = volume[tuple(index)] >= t
    return out


def area_matched_threshold(probs: np.ndarray, pixel_mm2: float, target_mm2: float,
                           candidates=AREA_THRESHOLDS) -> float:
    """The candidate threshold whose mean organ area per slice of ``probs`` ([slices,...],
    query grid) is nearest ``target_mm2``, the support slice's organ area.

    Why: across subjects the network over-segments (precision below recall at 0.5); the
    support slice tells how large the organ is at this level of the body, so its area is
    a label-free prior for each query third. The range stays near 0.5 so that a body
    of another size cannot push the threshold far."""
    flat = np.asarray(probs, np.float32).reshape(len(probs), -1)
    areas = np.array([np.count_nonzero(flat >= t) / len(flat) * pixel_mm2 for t in candidates])
    return float(candidates[int(np.argmin(np.abs(areas - target_mm2)))])


# The predictors evaluate() takes (kept importable from here: P.ModelPredictor, ...).
from .predictors import (EnsemblePredictor, LocationPriorPredictor,  # noqa: E402,F401
                                 MirrorAveragePredictor, ModelPredictor, MultiScalePredictor,
                                 RegistrationPredictor)


# ----------------------------------------------------------------------------- one fold
def _example(c, support, query, row) -> tuple:
    """Figure tiles of one class: the support slice (EP1's middle third, = EP2's), the middle
    query slice of the class with its label, and with the EP1 prediction."""
    from FewShotSegLib.overview import overlay, radiological
    s_image, s_label, s_axis, s_z, s_case = support
    q_image, truth, pred, q_axis, assignment, q_case = query
    z = (min(assignment) + max(assignment)) // 2
    s_cut = lambda a: radiological(np.take(a, s_z, axis=s_axis), s_image, s_axis)  # noqa: E731
    q_cut = lambda a: radiological(np.take(a, z, axis=q_axis), q_image, q_axis)  # noqa: E731
    q_grey = q_cut(sitk.GetArrayViewFromImage(q_image))
    return (CLASSES[c], [
        (f"support {s_case}:{s_z}", overlay(s_cut(sitk.GetArrayViewFromImage(s_image)),
                                            {"support": s_cut(s_label == c)})),
        (f"query {q_case}:{z} label", overlay(q_grey, {"label": q_cut(truth)})),
        (f"EP1 Dice {row['ep1']['dice']:.2f}", overlay(q_grey, {"label": q_cut(truth), "prediction": q_cut(pred)}))])


@dataclass
class FoldEvaluation:
    rows: list = field(default_factory=list)        # one dict per (query scan, class)
    examples: list = field(default_factory=list)    # (organ, [(caption, rgb tile), ...]) of the first query
    seconds: float = 0.0


def _dice(counts: dict | None) -> str:
    return f"{counts['dice']:.3f}" if counts else "  -  "


def support_examples(data_dir: Path, case: str, classes, preprocess, episode: str = "ep1",
                     axis: str = "axial") -> dict:
    """The labelled support slices of ``episode`` (EP1: three per class, EP2: one) on the
    model grid, ``{class: (images, masks)}``: the labels its test may read, as examples
    for test-time tuning."""
    image, label = load_chaos_case(data_dir, case)
    ax = array_axis_for(image, axis)
    prep = prepare_volume(image, ax, preprocess)
    out = {}
    for c in classes:
        zs = ep1_support_slices(label, c, ax) if episode == "ep1" else [ep2_support_slice(label, c, ax)]
        out[c] = (prep.model_slices(zs), prep.mask_to_model(label == c, indices=zs))
    return out


def merged_episodes(ep1: FoldEvaluation, ep2: FoldEvaluation) -> FoldEvaluation:
    """One evaluation from an EP1-only and an EP2-only one of the same scans and classes."""
    out = FoldEvaluation(examples=ep1.examples, seconds=ep1.seconds + ep2.seconds)
    for a, b in zip(ep1.rows, ep2.rows, strict=True):
        if (a["case"], a["class"]) != (b["case"], b["class"]):
            raise FewShotSegError("merged_episodes: the two evaluations scored different scans or classes")
        out.rows.append({**a, "ep2": b["ep2"], "ep2_post": b["ep2_post"]})
    return out


def evaluate(predictor, data_dir: Path, support_case: str, query_cases: list[str], classes,
             axis: str = "axial", progress=None, area_threshold: bool = False, on_ep1=None,
             blend_supports: bool = False, smooth_slices: bool = False,
             self_support: bool = False, intensity_gate: bool = False, gate_whole_mask: bool = False,
             episodes=("ep1", "ep2")) -> FoldEvaluation:
    """Score ``classes`` on the query scans with EP1 and EP2 from one support scan.

    Each query slice is encoded once and serves every class and both evaluations.
    ``area_threshold``: EP1 binarises each third with `area_matched_threshold` (else 0.5).
    ``blend_supports``: EP1 mixes the two nearest thirds' supports (`ep1_support_weights`).
    ``smooth_slices``: EP1 and EP2 smooth the probabilities across slices (`smooth_across_slices`).
    ``self_support``: EP1 and EP2 add a pass supported by the query's own slices (`self_supported`).
    ``intensity_gate``: EP1 and EP2 masks keep their confident centre's intensities (with
    ``gate_whole_mask``: the whole mask's), then their largest region (`gated_mask`).
    ``episodes``: those scored; the other's scores are None (a model tuned on EP1's three
    labelled slices may not score EP2: `merged_episodes` joins two such evaluations).
    ``on_ep1(context)``: sees each EP1 probability volume before it is binarised (for
    studies of the binarisation: benchmarks/binarisation_study.py)."""
    start = time.perf_counter()
    say = progress or (lambda message: None)
    s_image, s_label = load_chaos_case(data_dir, support_case)
    s_axis = array_axis_for(s_image, axis)
    s_prep = prepare_volume(s_image, s_axis, predictor.preprocess)
    plan = {c: (ep1_support_slices(s_label, c, s_axis), ep2_support_slice(s_label, c, s_axis)) for c in classes}
    needed = sorted({z for ep1, ep2 in plan.values() for z in ep1 + [ep2]})
    pos = {z: i for i, z in enumerate(needed)}
    s_feats = predictor.prepare(s_prep.model_slices(needed))
    s_masks = {c: s_prep.mask_to_model(s_label == c, indices=needed) for c in classes}
    out = FoldEvaluation()
    for qi, case in enumerate(query_cases):
        q_image, q_label = load_chaos_case(data_dir, case)
        q_axis = array_axis_for(q_image, axis)
        q_prep = prepare_volume(q_image, q_axis, predictor.preprocess)
        n = q_prep.num_slices
        q_array = sitk.GetArrayViewFromImage(q_image) if intensity_gate else None
        gate_core = 0.0 if gate_whole_mask else GATE_CORE_PROBABILITY
        q_feats = predictor.prepare(q_prep.model_slices(np.arange(n)))
        for c in classes:
            truth = q_label == c
            ep1_slices, ep2_slice = plan[c]
            assignment = ep1_assignment(q_label, c, q_axis)
            row = {"case": case, "class": int(c), "organ": CLASSES[c], "support_case": support_case,
                   "support_slices_ep1": ep1_slices, "support_slice_ep2": ep2_slice,
                   "query_range": [min(assignment), max(assignment)] if assignment else None}
            row["ep1"] = row["ep1_post"] = None
            if "ep1" in episodes:
                probs = torch.zeros((n, s_prep.size, s_prep.size))
                thresholds = []
                weights = (ep1_support_weights(assignment) if blend_supports
                           else {z: {p: 1.0} for z, p in assignment.items()})
                for part in range(PARTS):
                    zs = [z for z, w in weights.items() if part in w]
                    if zs:
                        i = pos[ep1_slices[part]]
                        w = torch.tensor([weights[z][part] for z in zs])[:, None, None]
                        probs[zs] += w * predictor.predict(s_feats[i], s_masks[c][i], q_feats[zs])
                    own = [z for z, p in assignment.items() if p == part]
                    if own:
                        thresholds.append((part, own, THRESHOLD))
                if self_support and assignment:
                    probs = self_supported(predictor, q_feats, probs, assignment)
                if smooth_slices:
                    probs = smooth_across_slices(probs, assignment)
                volume = q_prep.probs_to_volume(probs)
                if on_ep1 is not None and assignment:
                    on_ep1({"row": row, "volume": volume, "truth": truth, "parts": [(p, zs) for p, zs, _ in thresholds],
                            "q_image": q_image, "q_axis": q_axis, "s_image": s_image, "s_label": s_label,
                            "s_axis": s_axis, "class": c, "ep1_slices": ep1_slices})
                if area_threshold:
                    thresholds = [(part, zs, area_matched_threshold(
                        np.moveaxis(np.take(volume, zs, axis=q_axis), q_axis, 0), pixel_area(q_image, q_axis),
                        support_area(s_image, s_label, c, ep1_slices[part], s_axis))) for part, zs, _ in thresholds]
                    row["ep1_thresholds"] = [t for _, _, t in thresholds]
                ep1_pred = thresholded(volume, q_axis, [(zs, t) for _, zs, t in thresholds])
                if intensity_gate and assignment:
                    ep1_pred = gated_mask(ep1_pred, q_array, volume, q_axis, list(assignment), gate_core)
                row["ep1"] = count(ep1_pred, truth, list(assignment), q_axis).to_dict() if assignment else None
                row["ep1_post"] = (count(largest_component(ep1_pred, q_axis), truth, list(assignment), q_axis).to_dict()
                                   if assignment else None)
            row["ep2"] = row["ep2_post"] = None
            if "ep2" in episodes:
                i = pos[ep2_slice]
                probs = predictor.predict(s_feats[i], s_masks[c][i], q_feats[list(range(n))])
                if self_support and (extent := predicted_extent(probs)):
                    probs = self_supported(predictor, q_feats, probs, extent)
                if smooth_slices:
                    probs = smooth_across_slices(probs, range(n))
                volume = q_prep.probs_to_volume(probs)
                ep2_pred = volume >= THRESHOLD
                if intensity_gate:
                    ep2_pred = gated_mask(ep2_pred, q_array, volume, q_axis, core_probability=gate_core)
                row["ep2"] = count(ep2_pred, truth).to_dict()
                row["ep2_post"] = count(largest_component(ep2_pred, q_axis), truth).to_dict()
            out.rows.append(row)
            say(f"  {case:>3} {CLASSES[c]:13s} EP1 {_dice(row['ep1'])}  EP2 {_dice(row['ep2'])}  "
                f"EP2+post {_dice(row['ep2_post'])}")
            if qi == 0 and assignment and "ep1" in episodes:
                out.examples.append(_example(c, (s_image, s_label, s_axis, ep2_slice, support_case),
                                             (q_image, truth, ep1_pred, q_axis, assignment, case), row))
    out.seconds = time.perf_counter() - start
    return out
