"""What a user can set for one propagation, checked before any work (`propagation.py`).

Each field says why it has its default; the defaults chosen on data name the file that
measured them (docs/RESULTS.md, benchmarks/results/dev_choices.json)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from .errors import FewShotSegError
from .registration import DEMONS_ITERATIONS, REGISTRATION_SHRINK

MODES = ("auto", "learned", "chained", "direct", "registration")
STOP_RULES = ("rules", "learned", "none")


@dataclass
class PropagationOptions:
    mode: str = "auto"
    # 'auto': the array axis across which the painting lies in the fewest slices (the view
    # it was painted in); a name (axial, coronal, sagittal) or an array index is checked
    # against the painting (anchors.resolve_axis)
    axis: Union[str, int] = "auto"
    device: str = "cpu"
    # slices encoded per forward pass; None = 2 on CPU (per-slice cost measured lowest
    # there: 23 ms at 2 vs 46 ms at 8 on 2 cores; a walk that stops wastes less look-ahead)
    # and 16 on a GPU
    batch_size: Optional[int] = None
    threshold: float = 0.5
    num_threads: Optional[int] = None
    # chained: search radius around the previous slice's mask, in mm (None = whole slice)
    search_margin_mm: Optional[float] = 25.0
    # the structure has ended when a slice's area falls below this fraction of the painted area
    min_area_fraction: float = 0.05
    # chained: weight of the registration-carried previous mask fused with the model's
    # probability (0 = model only); registration follows shape, the model follows appearance.
    # 0.75 measured best of 0, 0.5, 0.75 on CHAOS-T2 (benchmarks/results/product_*.json, README)
    registration_weight: float = 0.75
    # learned: weight of a registration-only walk averaged with the step network's walk
    # (0 = the network's walk alone). Where registration still carries the mask the
    # network's probability needs 0.33 to count, where it does not 0.83 (at 0.4). Chosen
    # on development data (docs/RESULTS.md)
    registration_walk_weight: float = 0.4
    # learned: weight of the registration-carried mask averaged into every step's
    # probability (0 = the network's step alone). Not the default: at 0.25, on development
    # data, it kept what the network trims across thin slices (CHAOS-T2 painted coronally
    # +0.012) and the registration's leaks across 7.7 mm ones (-0.008; dev_choices.json)
    step_registration_weight: float = 0.0
    # learned mode: parts of a mask lying apart in a slice get crops of their own
    # (models.slicestep.crop_boxes); research opt-in until chosen on development data
    split_crops: bool = False
    # learned, on walks between two painted slices at most this many mm apart (0 = never):
    # the network's logits shifted so that the painted slice, stepping onto itself, keeps
    # its painted area (models.slicestep.zero_motion_offset). The network trims a mask a
    # little at every step, also where nothing moved, which compounds over many thin
    # slices; on an outward walk that trimming is part of how the walk ends, so it stays.
    # Not the default: on development data +0.011 on CHAOS-T2 painted coronally, -0.003 on a
    # CT painted sagittally (dev_choices.json)
    zero_motion_max_mm: float = 0.0
    # learned: outward walks also end where the step network says the structure has ended:
    # its own presence output (train_stepper --presence), else a read-out of its features
    # fitted beside it (Training/fit_presence.py; none is shipped); the zero-motion offset
    # (zero_motion_max_mm) then applies to outward walks too. Research opt-in: on
    # development data neither kind gained (a CPU-trained output +0.000; a read-out fitted
    # on ten cases' walks did not transfer: -0.040 with the offset; dev_choices.json)
    presence: bool = False
    # demons registration (registration mode and the fusion): field estimated on a grid
    # shrunk by this factor, for this many iterations (registration.py)
    registration_shrink: int = REGISTRATION_SHRINK
    registration_iterations: int = DEMONS_ITERATIONS
    # > registration_shrink: a first demons estimate on a grid shrunk this much starts the
    # fine one (research option, 0 = off; dev_choices.json)
    registration_coarse_shrink: int = 0
    # the structure has ended when fewer than this fraction of a slice's mask has
    # intensities inside the painted region's 5-95 % band (0 = area rule only)
    min_intensity_agreement: float = 0.5
    # where outward walks end: 'rules' = area, intensity band and growth (walks.py);
    # 'learned' = the fitted stop model (stopping.py; opt-in: it gained on CHAOS-T2 and lost
    # on the TotalSegmentator CT and MR structures, docs/RESULTS.md); 'none' = on until the
    # mask vanishes (for fitting a stop model)
    stop: str = "rules"
    # walks step at least this far (mm), filling the slices stepped over from the two steps
    # around them (walks.walk_stride); 0 = one step per slice. Opt-in: across 1.5 mm coronal
    # MRI slices twice as fast and better on development data, a little worse across 0.98 mm
    # CT slices there (benchmarks/results/dev_choices.json); only with the stop rules
    walk_step_mm: float = 0.0
    # how the slices to look at next are ranked: 'parts' = the sum of the heuristic parts
    # (suggestions.py); 'fitted' = a ridge regression of the slice's wrong pixels on them
    # (fitted on the step network's runs; chosen on development data, docs/RESULTS.md);
    # 'auto' = fitted in learned and chained modes when installed, parts otherwise
    suggest: str = "auto"
    # a second pass per slice that adds the slice's own confident prototypes (alpnet, crtpnet)
    query_prototypes: bool = False
    # Adam steps fitting the prototypes to their support before each query is scored (0 = off)
    support_refinement_steps: int = 0
    # the model also run at 1.5x its grid, probabilities averaged (models/multiscale.py). It
    # lifts the protocol's cross-scan episodes (+1.2 EP1) but not this same-scan walk
    # (CHAOS-T2 mean Dice 0.806 -> 0.803 with fusion, 0.707 -> 0.697 model alone), at
    # about 3x the network time and +65-95 MB peak memory (README): off by default
    multi_scale: bool = False
    # SGD steps tuning a copy of the model on the painted slice(s) before it propagates
    # (support_tuning.py: episodes between augmented painted slices, the training loss);
    # 0 = off. Slower (about 0.2 s a step on a 2-core CPU); gain measured in the README
    adapt_steps: int = 0
    # drop mask voxels far (3 robust SDs) in intensity from the confident and painted ones
    # (postprocessing.intensity_gated; the protocol's +ig). On by default in the few-shot and
    # registration modes: CHAOS-T2 mean Dice 0.806 -> 0.818 (network alone 0.707 -> 0.735), CT
    # agreement 0.864 -> 0.901 (README). Not applied in learned mode: the step network draws
    # its own edges, and the gate cost it on development data (docs/RESULTS.md)
    intensity_gate: bool = True
    # learned mode: on the slices not painted, cut the regions at the mask's edge whose
    # intensities lie outside the painted voxels' 5-95 % band (postprocessing.trimmed_unlike;
    # a walk carried them onto a neighbour). Opt-in: on development data +0.012 on CHAOS-T2
    # with one painted slice, but as much lost as gained elsewhere (dev_choices.json); held
    # out, it helped on MRI and cost about 0.01 on the CT (docs/RESULTS.md)
    trim_unlike: bool = False
    postprocess: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise FewShotSegError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise FewShotSegError("batch size must be at least 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise FewShotSegError(f"threads must be at least 1 (got {self.num_threads})")
        if not 0.0 < self.threshold < 1.0:
            raise FewShotSegError("threshold must lie strictly between 0 and 1")
        for name in ("registration_weight", "registration_walk_weight", "step_registration_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FewShotSegError(f"{name} must lie in [0, 1]")
        if not 0.0 <= self.min_intensity_agreement < 1.0:
            raise FewShotSegError("min_intensity_agreement must lie in [0, 1)")
        if not (_whole(self.registration_shrink, 1) and _whole(self.registration_iterations, 1)):
            raise FewShotSegError("registration_shrink and registration_iterations must be whole numbers >= 1")
        if not _whole(self.registration_coarse_shrink, 0):
            raise FewShotSegError("registration_coarse_shrink must be a whole number >= 0 (0: off)")
        if not (isinstance(self.walk_step_mm, (int, float)) and 0.0 <= self.walk_step_mm <= 100.0):
            raise FewShotSegError("walk_step_mm must lie in [0, 100] (mm; 0 = one step per slice)")
        if not (isinstance(self.zero_motion_max_mm, (int, float)) and 0.0 <= self.zero_motion_max_mm <= 100.0):
            raise FewShotSegError("zero_motion_max_mm must lie in [0, 100] (mm; 0 = never)")
        if not 0.0 <= self.min_area_fraction < 1.0:
            raise FewShotSegError("min_area_fraction must lie in [0, 1)")
        if self.suggest not in ("auto", "parts", "fitted"):
            raise FewShotSegError(f"unknown suggestion ranking '{self.suggest}'; choose auto, parts or fitted")
        if self.stop not in STOP_RULES:
            raise FewShotSegError(f"unknown stop rule '{self.stop}'; choose one of {', '.join(STOP_RULES)}")
        for name in ("support_refinement_steps", "adapt_steps"):
            if not _whole(getattr(self, name), 0):
                raise FewShotSegError(f"{name} must be a whole number >= 0")
        for name in ("query_prototypes", "multi_scale", "intensity_gate", "trim_unlike", "postprocess", "presence"):
            if getattr(self, name) not in (True, False):  # also 0/1, as the benchmarks' --option pass
                raise FewShotSegError(f"{name} must be true or false, not {getattr(self, name)!r}")


def _whole(value, least: int) -> bool:
    """A whole number (2 or 2.0, not True or None) of at least ``least``."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value == int(value) and value >= least)
