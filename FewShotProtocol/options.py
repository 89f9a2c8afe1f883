"""The protocol's test-time options: what a ``<model>+<key>`` row changes at inference, with
the same trained weights (`protocol.evaluate` and benchmarks/fewshot_protocol.py read them).
Each option's description is written from its constants, so a row's notes say what ran."""
from __future__ import annotations

from dataclasses import dataclass, fields

from FewShotSegLib.errors import FewShotSegError
from .location_prior import PRIOR_MARGIN, PRIOR_SIGMA
from FewShotSegLib.models.multiscale import MULTI_SCALES
from FewShotSegLib.models.support_zoom import SUPPORT_ZOOMS
from FewShotSegLib.postprocessing import GATE_CORE_PROBABILITY, GATE_ROBUST_SDS
from .self_support import SELF_SUPPORT_MIX
from FewShotSegLib.support_tuning import TUNE_LR

# +zs: a triangle over 5 slices, {offset: weight}; the row's description is written from it.
_SLICE_WEIGHTS = (1, 2, 3, 2, 1)
SLICE_KERNEL = {k - len(_SLICE_WEIGHTS) // 2: w / sum(_SLICE_WEIGHTS) for k, w in enumerate(_SLICE_WEIGHTS)}


# +tune: SGD steps of the training loss on the support scan's labelled slices
# (support_tuning.py); chosen on the shipped checkpoint (docs/PROTOCOL.md).
SUPPORT_TUNING = {"steps": 300, "lr": TUNE_LR}
# +ir: the probability that a tuning episode's image (support and query, each on its own)
# goes through a random intensity curve (augmentation.remap_intensities).
TUNING_REMAP = 0.5


# Test-time options scored with a row's own trained weights (row ``<model>+<key>``).
@dataclass(frozen=True)
class TestTime:
    """What a ``+key`` row changes at inference: model options, and/or EP1's binarisation."""
    model_options: dict
    what: str
    area_threshold: bool = False    # EP1: per-third threshold matching the support's organ area
    mirrored: bool = False          # average with the left-right mirrored episode (MirrorAveragePredictor)
    blended: bool = False           # EP1: blend the two nearest thirds' supports (ep1_support_weights)
    smoothed: bool = False          # EP1 and EP2: probabilities smoothed across adjacent slices
    multiscale: bool = False        # average over the episode at several grid sizes (MultiScalePredictor)
    support_zoom: bool = False      # the support slice also zoomed about its organ (SupportZoomModel)
    location_prior: bool = False    # probabilities times the support's place in the body (LocationPriorPredictor)
    self_support: bool = False      # a second pass supported by the query's own slices (self_support)
    ensemble: bool = False          # averaged with a second fold model (EnsemblePredictor; --ensemble-with)
    support_tuning: bool = False    # each model first tuned on its episode's labelled support slices
    tuning_remap: bool = False      # that tuning also draws random intensity curves (needs tune)
    intensity_gate: bool = False    # EP1 and EP2: the mask keeps the intensities of its confident centre
    gate_whole_mask: bool = False   # that gate's statistics from the whole mask, not its confident centre


TEST_TIME = {
    "qp": TestTime({"query_prototypes": True},
                   "test-time query prototypes (a second pass adds the query's confident pixels)"),
    "sr": TestTime({"support_refinement_steps": 20},
                   "test-time prototype refinement: 20 Adam steps fitting the prototypes to their support slice"),
    "at": TestTime({}, "query-adaptive threshold (EP1): per third, the threshold in 0.4..0.7 whose mean "
                       "organ area per query slice is nearest the support slice's (EP2 keeps 0.5)",
                   area_threshold=True),
    "mirror": TestTime({}, "test-time augmentation: the probabilities averaged with those of the left-right "
                           "mirrored support and query (mirrored back)", mirrored=True),
    "blend": TestTime({}, "blended supports (EP1): each query slice's probability mixes the predictions of the "
                          "two nearest thirds' support slices, linearly in its position (the same three labelled "
                          "slices; the papers use its own third's alone; EP2 unchanged)", blended=True),
    "zs": TestTime({}, "slice smoothing: each scored query slice's probability averaged with its neighbours' "
                       f"(a triangle over {len(_SLICE_WEIGHTS)} slices, weights {','.join(map(str, _SLICE_WEIGHTS))} "
                       f"/{sum(_SLICE_WEIGHTS)}, over the scored slices only)", smoothed=True),
    "ms": TestTime({}, "multi-scale: the probabilities averaged over the episode resampled to "
                       f"{' and '.join(f'{v:g}' for v in MULTI_SCALES)} times the grid (support, mask, queries; "
                       "resampled back)", multiscale=True),
    "sz": TestTime({}, "support zoom: the support slice and its mask also zoomed by "
                       f"{' and '.join(f'{v:g}' for v in SUPPORT_ZOOMS)} about the organ's centre, as further "
                       "supports (still one labelled slice)", support_zoom=True),
    "loc": TestTime({}, "location prior: the probabilities times a prior that is 1 within "
                        f"{PRIOR_MARGIN:g} of the body's size of the support mask mapped by the two body outlines' "
                        f"boxes, a Gaussian of {PRIOR_SIGMA:g} beyond (the support slice's label only)",
                    location_prior=True),
    "ss": TestTime({}, "query self-support: a second pass whose supports are the query's own slices at the "
                       "centres of the scored range's thirds (EP1; EP2: of the first pass's largest 3D region's "
                       "slices), each labelled by the first pass (largest region at 0.5); a slice between two "
                       f"blends them by position; averaged {1 - SELF_SUPPORT_MIX:g}/{SELF_SUPPORT_MIX:g} with "
                       "the first pass (no query label read)",
                   self_support=True),
    "ens": TestTime({}, "ensemble: the probabilities averaged with those of the same fold's and setting's model "
                        "of each further run named (--ensemble-with), trained on the same scans outside the fold "
                        "(named in the row's checkpoints)",
                    ensemble=True),
    "tune": TestTime({}, f"test-time tuning: each model first tuned {SUPPORT_TUNING['steps']} SGD steps "
                         f"(lr {SUPPORT_TUNING['lr']:g}) of its training loss on episodes between its "
                         "episode's labelled support slices of each test organ (EP1: the three; EP2: the one), "
                         "augmented as in training (no query label read)", support_tuning=True),
    "ir": TestTime({}, f"intensity remap in test-time tuning: each tuning image (support and query) also, with "
                       f"probability {TUNING_REMAP:g}, through its own random non-monotonic intensity curve (the "
                       "organ changes brightness between support and query, not shape or place)",
                   tuning_remap=True),
    "ig": TestTime({}, "intensity gate: each binarised mask loses the voxels more than "
                       f"{GATE_ROBUST_SDS:g} robust SDs (1.4826 MAD) from the median intensity of its confident "
                       f"voxels (probability >= {GATE_CORE_PROBABILITY:g}; EP1: of the scored slices), then keeps "
                       "its largest 3D region, holes filled (the query scan's own intensities; no label read)",
                   intensity_gate=True),
    "igw": TestTime({}, f"intensity gate, whole mask: each binarised mask loses the voxels more than "
                        f"{GATE_ROBUST_SDS:g} robust SDs (1.4826 MAD) from the median intensity of the whole mask "
                        "(EP1: of the scored slices), then keeps its largest 3D region, holes filled (the query "
                        "scan's own intensities; no label read)",
                    intensity_gate=True, gate_whole_mask=True),
}


def test_time_option(key: str) -> TestTime:
    """The test-time option of a row's ``+`` part; ``blend+at`` combines options (their model
    options merged, their switches all on). Unknown keys raise one clear line."""
    parts = key.split("+")
    unknown = [k for k in parts if k not in TEST_TIME]
    if unknown or not key:
        raise FewShotSegError(f"unknown test-time option '{key}'; available: {', '.join(TEST_TIME)} "
                              "(combined with '+', e.g. blend+at)")
    if "ir" in parts and "tune" not in parts:
        raise FewShotSegError(f"test-time options '{key}': ir changes test-time tuning; add tune (e.g. tune+ir)")
    if len(parts) == 1:
        return TEST_TIME[key]
    if len(set(parts)) < len(parts) or sum(bool(TEST_TIME[k].model_options) for k in parts) > 1:
        raise FewShotSegError(f"test-time options '{key}': each at most once, and one of qp, sr at most")
    if {"ig", "igw"} <= set(parts):
        raise FewShotSegError(f"test-time options '{key}': one of ig, igw at most (two statistics of one gate)")
    options = [TEST_TIME[k] for k in parts]
    switches = [f.name for f in fields(TestTime) if f.name not in ("model_options", "what")]
    return TestTime({k: v for o in options for k, v in o.model_options.items()},
                    "; ".join(o.what for o in options),
                    **{name: any(getattr(o, name) for o in options) for name in switches})


def known_test_time(key: str):
    """`test_time_option` of a key, or None where it names no option (``""`` or an unknown one)."""
    try:
        return test_time_option(key)
    except FewShotSegError:
        return None
