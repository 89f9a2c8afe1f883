"""Painted slice(s) -> every slice of the volume: the engine behind "paint one slice, click once".

Painted slices are anchors, returned exactly as painted; slices that hold only excluded
voxels are end anchors, where the structure is absent (`anchors.py`). Between two painted
slices the structure is carried from both sides and blended by distance; beyond the
outermost painted slices it is carried outward until it ends. A `PropagationSession`
keeps what the next run on the same volume can reuse (`session.py`), so a correction
recomputes only the spans next to it, and every run says which filled slices most likely
need a look (`suggestions.py`).

Modes
* ``auto`` (default): the model's own: ``learned`` for a step network, ``chained`` for a
  few-shot model, ``registration`` without a model.
* ``learned``: registration carries the mask and the step network (a checkpoint of kind
  'propagator', `models/slicestep.py`) corrects it at every step of the walk. A
  registration-only walk from the same painted slices runs beside it (the slice pairs'
  fields are shared, so it costs little) and the two are averaged
  (``registration_walk_weight``): their errors differ, the network's where it trims or
  stops, registration's where it carries a leak along.
* ``chained``: walk away from each painted slice (`walks.py`); each
  prediction becomes a support for the next slice, the walk's painted slice always
  stays in the support set, and the search is limited to the neighbourhood of the
  previous slice's mask (organs move little from one slice to the next).
* ``direct``: every slice against the painted slices only (batched, order-free).
* ``registration``: no learning; slice-to-slice deformable registration (our torch
  demons, `registration.py`) carries the mask along, as a non-learned comparator.

In every mode the walk stops by itself where the structure ends (the predicted area
falls below a fraction of the painted area, or its intensities stop looking like the
painted ones); then the probabilities are thresholded, the intensity gate drops voxels
far from the structure's intensity (`postprocessing.intensity_gated`; not in learned
mode, where the network draws the edges), the 3D result is
cleaned (`postprocessing.clean_mask`) and the painted slices are returned exactly as
painted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from .anchors import axis_name, check_editable, check_exclusion, plan_spans, resolve_axis, slices_holding
from .errors import FewShotSegError
from .extent import intensity_agreement, intensity_band
from .models.multiscale import MultiScaleModel
from .options import MODES, PropagationOptions
from .postprocessing import clean_mask, intensity_gated, trimmed_unlike
from .preprocessing import prepare_volume
from .session import PropagationSession, digest
from .stopping import load_presence_model, load_stop_model
from .suggestions import SliceSuggestion, load_suggestion_model, rank_slices
from .walks import Walk, WalkContext, walk, walk_stride

ProgressCallback = Callable[[float, str], None]
CancelCallback = Callable[[], bool]
FITTED_SUGGEST_MODES = ("learned", "chained")


class PropagationCancelled(FewShotSegError):
    """The user pressed Cancel; nothing was written."""


# a painting under this many voxels on its largest slice is no cross-section of a structure
FEW_PAINTED_VOXELS = 5


@dataclass
class PropagationResult:
    mask: np.ndarray              # uint8, volume array order, 1 = structure
    probability: np.ndarray       # float32 foreground probability, same shape
    slices_done: int              # slices the model (or registration) was run on
    seconds: float
    network_seconds: float = 0.0  # time inside the network's forward passes
    adapt_seconds: float = 0.0    # tuning the model on the painted slices (adapt_steps)
    stopped_at: dict = field(default_factory=dict)  # "anchor->last slice" -> first slice judged empty
    axis_index: int = 0           # numpy axis the slices were taken across
    anchors: list = field(default_factory=list)      # painted slices (returned exactly)
    end_anchors: list = field(default_factory=list)  # excluded-only slices (structure absent)
    suggestions: list = field(default_factory=list)  # SliceSuggestion, most likely wrong first
    warnings: list = field(default_factory=list)     # walks that stopped while the structure was large
    walks_computed: int = 0       # walks run this time
    walks_reused: int = 0         # walks taken from the session unchanged
    mode: str = ""                # the mode that ran
    slice_features: dict = field(default_factory=dict)  # slice -> suggestions.SUGGEST_FEATURES (fitting)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an unavailable device is a clear error."""
    name = (name or "cpu").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FewShotSegError("device 'cuda' requested but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FewShotSegError("device 'mps' requested but Apple MPS is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FewShotSegError(f"unknown device '{name}' (use cpu, cuda, mps or auto)") from None


FEW_SHOT_OPTIONS = ("multi_scale", "adapt_steps", "query_prototypes", "support_refinement_steps")


def resolved_mode(model, mode: str) -> str:
    """'auto' -> the mode the model runs in: a step network 'learned', a few-shot model
    'chained', no model 'registration'; any other mode as given."""
    if mode != "auto":
        return mode
    if model is None:
        return "registration"
    return "learned" if getattr(model, "kind", None) == "propagator" else "chained"


def _checked_kind(model, options: PropagationOptions):
    """Learned mode runs on a step network, chained and direct on a few-shot model: the
    wrong kind of checkpoint, or a few-shot model's option given to a step network, is one
    clear line, before any work."""
    mode, kind = options.mode, getattr(model, "kind", None)
    where = f" ({model.path.name})" if hasattr(model, "path") else ""
    if mode == "learned":
        used = [name for name in FEW_SHOT_OPTIONS if getattr(options, name)]
        if used:
            raise FewShotSegError(f"{used[0]} applies to few-shot models (mode chained or direct), "
                                  "not to the step network of mode 'learned'")
    if mode == "learned" and kind != "propagator":
        got = "no model" if model is None else f"a {kind or 'few-shot'} model{where}"
        raise FewShotSegError(f"mode 'learned' needs a propagator checkpoint (step network); got {got}")
    if mode in ("chained", "direct") and kind == "propagator":
        raise FewShotSegError(f"the model{where} is a propagator (step network): use mode 'learned', "
                              f"or a few-shot model for mode '{mode}'")
    return model


class KeptOut:
    """Slice -> the kept-out pixels on the model grid (bool), made on first read; None for
    a slice holding none."""

    def __init__(self, rows=(), make: Optional[Callable[[int], torch.Tensor]] = None):
        self.rows, self.make, self.made = set(rows), make, {}

    def __contains__(self, index: int) -> bool:
        return index in self.rows

    def get(self, index: int) -> Optional[torch.Tensor]:
        if index not in self.rows:
            return None
        if index not in self.made:
            self.made[index] = self.make(index)
        return self.made[index]


class Propagator:
    """Runs one propagation; a class so the steps stay small and readable:
    anchors and spans (`anchors.py`) -> walks (`walks.py`, cached by `session.py`) ->
    one probability volume -> threshold, gate, clean-up -> where to look next."""

    def __init__(self, image: sitk.Image, support: np.ndarray, model, options: PropagationOptions,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCallback] = None,
                 exclude: Optional[np.ndarray] = None, session: Optional[PropagationSession] = None,
                 editable: Optional[np.ndarray] = None):
        options.validate()
        options = replace(options, mode=resolved_mode(model, options.mode))
        self.image, self.options = image, options
        self.support = np.asarray(support, bool)
        shape = sitk.GetArrayViewFromImage(image).shape
        if self.support.shape != shape:
            raise FewShotSegError(f"support mask shape {self.support.shape} differs from the image "
                                  f"{shape}; resample it onto the image first")
        self.axis_index = resolve_axis(image, self.support, options.axis, exclude)
        self.exclude = check_exclusion(self.support, exclude, self.axis_index)
        # never in the result and never walked through: the exclusions and what lies outside
        # the editable area (unlike an exclusion, that does not say the structure is absent)
        outside = check_editable(self.support, editable)
        self.keep_out = outside if self.exclude is None else (self.exclude if outside is None
                                                              else self.exclude | outside)
        self.model = _checked_kind(model, options)
        self.session = session if session is not None else PropagationSession()
        self.progress = progress or (lambda fraction, message: None)
        self.cancel = cancel or (lambda: False)
        self.n = self.support.shape[self.axis_index]
        if self.n < 2:
            raise FewShotSegError(f"the volume has a single slice across {axis_name(image, self.axis_index)}: "
                                  "nothing to propagate to")
        self.painted = [int(i) for i in slices_holding(self.support, self.axis_index)]
        excluded_slices = [] if self.exclude is None else slices_holding(self.exclude, self.axis_index)
        self.ends = sorted(set(int(i) for i in excluded_slices) - set(self.painted))
        self.spans = plan_spans(self.painted, self.ends, self.n)
        self._excluded = KeptOut()          # slice -> kept-out pixels on the model grid
        self._exclusion_keys: dict = {}    # slice -> digest of its exclusion (walk keys)
        self.adapt_seconds = 0.0
        self._walk = (0.05, 0.9)       # progress fractions: the walks' start and width
        self._steps = [0, 1]           # walk steps done, expected
        self._what = "slices propagated"   # the progress message's words
        self._loaded_stop_model = None     # stop 'learned': read at the first walk
        self._stride = 1                   # slices per walk step (walks.walk_stride)

    # -- helpers ---------------------------------------------------------------------
    def _check_cancel(self):
        if self.cancel():
            raise PropagationCancelled("propagation cancelled; the segmentation was not changed")

    def _min_area(self, painted_area: float) -> float:
        return max(4.0, self.options.min_area_fraction * painted_area)

    def _on_step(self):
        self._steps[0] += 1
        done, total = self._steps
        self.progress(self._walk[0] + self._walk[1] * min(1.0, done / total), f"{done} {self._what}")

    def _preprocess(self):
        """The model's pre-processing; registration alone uses the default one."""
        from .preprocessing import PreprocessConfig
        return getattr(self.model, "preprocess", None) or PreprocessConfig()

    # -- the run -------------------------------------------------------------------------
    def run(self) -> PropagationResult:
        start = time.perf_counter()
        opts = self.options
        if opts.num_threads:
            torch.set_num_threads(int(opts.num_threads))
        self.progress(0.0, "preparing the volume")
        session = self.session
        session.open(self.image, self.model, self.axis_index, opts,
                     lambda: prepare_volume(self.image, self.axis_index, self._preprocess()))
        prepared = session.prepared
        self._stride = (walk_stride(opts.walk_step_mm, prepared.spacing[self.axis_index])
                        if opts.stop == "rules" and not opts.presence else 1)   # fitted on single steps
        self.painted_masks = dict(zip(self.painted, prepared.mask_to_model(self.support, self.painted)))
        self._excluded = self._excluded_on_model_grid(prepared)
        self._check_cancel()
        network_seconds = 0.0
        if opts.mode == "registration":
            ctx = self._context(None, None)
            walks = self._walks(ctx)
        elif opts.mode == "learned":
            if opts.registration_walk_weight > 0:
                self._walk = (0.05, 0.8)
            walks, network_seconds = self._run_stepper()
        else:
            walks, network_seconds = self._run_model(prepared)
        probs = self._blended(walks)
        if opts.mode == "learned" and opts.registration_walk_weight > 0:
            self._walk, self._what = (0.85, 0.1), "slices carried by registration alone"
            beside = self._blended(self._walks(self._context(None, None), kind="registration"))
            probs = averaged(probs, beside, opts.registration_walk_weight)
        probs_vol, touched = self._probability_volume(prepared, probs)
        self._check_cancel()
        self.progress(0.97, "post-processing")
        mask, probs_vol = self._finish(probs_vol, touched)
        slice_features: dict = {}
        ranking, note = self._suggestion_model()
        suggestions, warnings = rank_slices(self.spans, walks, set(self.painted), set(self.ends), self.n,
                                            model=ranking, features_out=slice_features)
        warnings += [note] if note else []
        largest = max((int(np.moveaxis(self.support, self.axis_index, 0)[p].sum()) for p in self.painted), default=0)
        if 0 < largest < FEW_PAINTED_VOXELS:
            warnings.insert(0, f"the painting holds {largest} voxel{'s' * (largest > 1)} on its largest slice: a stray "
                               "click? paint the structure's whole cross-section on a slice")
        for name in ("trim_unlike", "presence"):
            if getattr(opts, name) and opts.mode != "learned":
                warnings.append(f"{name} applies to the step network (mode learned) only; not applied in mode {opts.mode}")
        stops = {f"{s.start}->{s.slices[-1]}": ws[0].stop["slice"]
                 for s, ws in walks.items() if s.kind == "outward" and ws[0].stop is not None}
        done = sum(w.steps for ws in walks.values() for w in ws)
        self.progress(1.0, f"{len(touched)} slices filled")
        return PropagationResult(
            mask=mask, probability=probs_vol, slices_done=done, seconds=time.perf_counter() - start,
            network_seconds=network_seconds, stopped_at=stops, adapt_seconds=self.adapt_seconds,
            axis_index=self.axis_index, anchors=list(self.painted), end_anchors=list(self.ends),
            suggestions=suggestions, warnings=warnings,
            walks_computed=session.computed, walks_reused=session.reused, mode=opts.mode,
            slice_features=slice_features)

    def _suggestion_model(self):
        """(the fitted ranking of where to look next or None, a warning or None), in the
        modes it was chosen for on development data; it lost there in registration mode."""
        wanted = self.options.suggest == "fitted" or (
            self.options.suggest == "auto" and self.options.mode in FITTED_SUGGEST_MODES)
        if not wanted:
            return None, None
        try:
            return load_suggestion_model(beside=getattr(self.model, "path", None)), None
        except FewShotSegError as exc:   # a damaged ranking must not cost the user the result
            return None, f"{exc}; the slices to check are ranked by the plain sum"

    def _excluded_on_model_grid(self, prepared) -> "KeptOut":
        """Slice -> kept-out pixels on the model grid (excluded, or outside the editable
        area), for the slices holding any; each slice resampled when a walk first reads it
        (an editable area can reach every slice of a CT, most of which no walk visits)."""
        if self.keep_out is None:
            return KeptOut()
        rows = [int(i) for i in slices_holding(self.keep_out, self.axis_index)]
        self._exclusion_keys = {i: digest(np.take(self.keep_out, i, axis=self.axis_index)) for i in rows}
        return KeptOut(rows, lambda i: prepared.mask_to_model(self.keep_out, [i])[0] >= 0.5)

    def _context(self, net, features) -> WalkContext:
        opts = self.options
        fields = self.session.fields if (net is None or opts.registration_weight) else None
        return WalkContext(net=net, features=features, slices=self.session.slices, fields=fields,
                           painted_masks=self.painted_masks.__getitem__, excluded=self._excluded.get,
                           exclusion_key=self._exclusion_keys.get,
                           options=opts, radius=self._search_radius_px(self.session.prepared) if net else None,
                           min_area=self._min_area, check_cancel=self._check_cancel, on_step=self._on_step,
                           stop_model=self._stop_model(), never_stop=opts.stop == "none", stride=self._stride,
                           spacing_mm=float(self.session.prepared.spacing[self.axis_index]))

    def _stop_model(self):
        """The fitted stop model for stop 'learned' (read once per run: the network's walks
        and the registration walks beside them use the same one), else None."""
        if self.options.stop != "learned":
            return None
        if self._loaded_stop_model is None:
            self._loaded_stop_model = load_stop_model(beside=getattr(self.model, "path", None))
            if self._loaded_stop_model is None:
                raise FewShotSegError("stop rule 'learned': no fitted stop model is installed "
                                      "(fewshotseg-propagator.stop.json)")
        return self._loaded_stop_model

    def _presence_model(self, stepper):
        """The presence read-out fitted for this step network (options.presence)."""
        model = load_presence_model(stepper, beside=getattr(self.model, "path", None))
        if model is None:
            raise FewShotSegError("presence: no presence model is fitted for this step network "
                                  "(<checkpoint>.presence.json; Training/fit_presence.py)")
        return model

    def _inward(self, span) -> Optional[int]:
        """The painted slice next to an outward span's anchor on the other side, if any."""
        pos = self.painted.index(span.start)
        other = pos + 1 if span.direction == "down" else pos - 1
        return self.painted[other] if 0 <= other < len(self.painted) else None

    def _walk_key(self, start: int, slices: tuple, stop_rule: bool, inward: Optional[int], absent: bool,
                  kind: str) -> tuple:
        excl = tuple((i, self._exclusion_keys[i]) for i in slices if i in self._excluded)
        masks = [digest(self.painted_masks[i].numpy()) for i in (start, inward) if i is not None]
        key = (start, inward, tuple(masks), slices, stop_rule, absent, excl, kind)
        if self.options.adapt_steps:   # the tuned model depends on every painted slice
            key += (digest(np.stack([self.painted_masks[p].numpy() for p in self.painted])),)
        return key

    def _walks(self, ctx: WalkContext, kind: str = "") -> dict:
        """span -> [walk] ('outward') or [walk from below, walk from above] ('between').
        ``kind`` tells apart walks of one run that read the same anchors differently (the
        registration walk beside the step network's)."""
        todo = []
        for span in self.spans:
            if span.kind == "between":
                todo.append((span, span.start, span.slices, False, None, False))
                todo.append((span, span.end, span.slices[::-1], False, None, False))
            else:
                todo.append((span, span.start, span.slices, True, self._inward(span), span.end in self.ends))
        keyed = [item + (self._walk_key(*item[1:], kind),) for item in todo]
        self._steps = [0, max(1, sum(-(-len(item[2]) // self._stride) for item in keyed
                                     if item[-1] not in self.session.walks))]
        walks: dict = {}
        for span, start, slices, stop, inward, absent, key in keyed:
            offset = ("zero-motion",) if ctx.offset(start, outward=stop) else ()   # its steps differ
            memory = self.session.steps((start, key[2][0], slices[0] > start) + key[7:] + offset)
            w = self.session.walk(key, lambda: walk(ctx, start, list(slices), stop, inward, absent, memory))
            walks.setdefault(span, []).append(w)
        return walks

    def _blended(self, walks: dict) -> dict:
        """The walks' model-grid probabilities, slice -> tensor; between two painted slices
        the two sides are blended by distance (each side counts more near its own slice)."""
        slices = {}
        for span, ws in walks.items():
            if span.kind == "between":
                a, b = span.start, span.end
                for i in span.slices:
                    w_a = (b - i) / (b - a)
                    p_a, p_b = ws[0].probs.get(i), ws[1].probs.get(i)
                    parts = [w * p for w, p in ((w_a, p_a), (1 - w_a, p_b)) if p is not None]
                    if parts:
                        slices[i] = sum(parts)
            else:
                slices.update(ws[0].probs)
        return slices

    def _probability_volume(self, prepared, slices: dict):
        """Model-grid probabilities (slice -> tensor) -> one volume."""
        touched = sorted(i for i, p in slices.items() if bool((p > 0).any()))
        size = prepared.size
        stack = torch.stack([slices[i] for i in touched]) if touched else torch.zeros((0, size, size))
        return prepared.slices_to_volume(touched, stack), touched

    def _finish(self, probs_vol: np.ndarray, touched: list[int]):
        """Painted slices exact, excluded voxels out, then threshold, gate and clean-up
        inside the box that holds every nonzero probability and the painting."""
        support_moved = np.moveaxis(self.support, self.axis_index, 0)
        prob_moved = np.moveaxis(probs_vol, self.axis_index, 0)
        for p in self.painted:
            prob_moved[p] = support_moved[p]
        mask = np.zeros(self.support.shape, np.uint8)
        box = self._result_box(prob_moved, support_moved, touched)
        if box is not None:
            excluded = None
            if self.keep_out is not None:
                excluded = np.moveaxis(self.keep_out, self.axis_index, 0)[box]
                prob_moved[box][excluded] = 0.0
            inner = self._finished_mask(prob_moved[box], support_moved[box], box)
            if excluded is not None:
                inner[excluded] = 0
            np.moveaxis(mask, self.axis_index, 0)[box] = inner
        return mask, probs_vol.astype(np.float32, copy=False)

    def _result_box(self, prob_moved: np.ndarray, support_moved: np.ndarray, touched) -> Optional[tuple]:
        """The box (slices first) holding every nonzero probability and the painting.

        Outside it the mask is 0 whatever the threshold, and the gate and the clean-up
        already work inside the mask's box: post-processing there alone gives the same
        mask, without whole-volume passes (a CT organ fills a small part of its scan)."""
        rows = sorted(set(touched) | set(self.painted))
        if not rows:
            return None
        lo, hi = rows[0], rows[-1] + 1
        present = (prob_moved[lo:hi] > 0) | support_moved[lo:hi]
        in_rows = np.flatnonzero(present.any(axis=(0, 2)))
        in_cols = np.flatnonzero(present.any(axis=(0, 1)))
        if in_rows.size == 0:
            return None
        return (slice(lo, hi), slice(int(in_rows[0]), int(in_rows[-1]) + 1),
                slice(int(in_cols[0]), int(in_cols[-1]) + 1))

    def _finished_mask(self, probs: np.ndarray, support: np.ndarray, box: tuple) -> np.ndarray:
        """Threshold, intensity gate and 3D clean-up of the boxed probabilities (slices
        first); the painted slices come back exactly as painted."""
        mask = probs >= self.options.threshold
        if self.options.intensity_gate and self.options.mode != "learned":
            # painted slices have probability 1, so they are always in the confident core
            image = np.moveaxis(sitk.GetArrayViewFromImage(self.image), self.axis_index, 0)[box]
            mask = intensity_gated(mask, image, probs)
        elif self.options.trim_unlike and self.options.mode == "learned":
            image = np.moveaxis(sitk.GetArrayViewFromImage(self.image), self.axis_index, 0)[box]
            mask = trimmed_unlike(mask, image, support, self._in_plane_spacing())
        if self.options.postprocess:
            mask = clean_mask(mask, support, 0)
        else:
            painted = [p - box[0].start for p in self.painted]
            mask[painted] = support[painted]
        return mask.view(np.uint8)

    # -- learned modes -------------------------------------------------------------------
    def _run_stepper(self):
        stepper = self.model.model if hasattr(self.model, "model") else self.model
        stepper.to(resolve_device(self.options.device), memory_format=torch.channels_last).eval()
        ctx = self._context(None, None)
        ctx.stepper = stepper
        if self.options.presence and not stepper.config.get("presence"):   # else its own output
            ctx.presence_model = self._presence_model(stepper)
        walks = self._walks(ctx)
        return walks, ctx.network_seconds

    def _run_model(self, prepared):
        opts = self.options
        device = resolve_device(opts.device)
        model = self.model.model if hasattr(self.model, "model") else self.model
        if opts.query_prototypes and not getattr(model, "supports_query_prototypes", False):
            raise FewShotSegError(f"model '{model.name}' does not take query prototypes (alpnet and crtpnet do)")
        model.to(device).eval()
        if opts.adapt_steps:
            model = self._adapted(model, prepared)
        self.batch = int(opts.batch_size) if opts.batch_size is not None else (2 if device.type == "cpu" else 16)
        net = MultiScaleModel(model, prepared.size) if opts.multi_scale else model
        features = self.session.feature_cache(net, device, self.batch)
        encode_before = features.seconds
        # this run's inference choices, not the loaded model's (restored afterwards)
        chosen = {"query_prototypes": bool(opts.query_prototypes),
                  "support_refinement_steps": int(opts.support_refinement_steps)}
        saved = {k: model.config[k] for k in chosen if k in model.config}
        model.config.update({k: chosen[k] for k in saved})
        try:
            with torch.inference_mode():
                ctx = self._context(net, features)
                walks = self._direct(ctx) if opts.mode == "direct" else self._walks(ctx)
        finally:
            model.config.update(saved)
        return walks, ctx.network_seconds + features.seconds - encode_before

    def _adapted(self, model, prepared):
        """A copy of the model tuned on the painted slices; the walk's progress then starts
        half-way (tuning takes about as long as the walk on a CPU)."""
        from .support_tuning import TUNE_LR, tuned_on_support

        steps = int(self.options.adapt_steps)
        masks = torch.stack([self.painted_masks[p] for p in self.painted])
        examples = {1: (prepared.model_slices(self.painted), masks)}

        def on_step(done, total):
            self._check_cancel()
            if done % 10 == 0 or done == total:
                self.progress(0.5 * done / total, f"adapting the model to the painted slices ({done}/{total})")

        start = time.perf_counter()
        adapted = tuned_on_support(model, examples, steps, TUNE_LR, seed=0, on_step=on_step)
        self.adapt_seconds = time.perf_counter() - start
        self._walk = (0.5, 0.45)
        return adapted

    def _direct(self, ctx: WalkContext) -> dict:
        """Score every slice of the spans against all painted slices at once (batched), then
        keep, walking outward, the run of slices where the structure is present."""
        sup_feats = torch.stack([ctx.features.get(i, self.painted) for i in self.painted])
        sup_masks = torch.stack([self.painted_masks[i] for i in self.painted]).to(sup_feats.device)
        todo = sorted({i for span in self.spans for i in span.slices})
        self._steps = [0, max(1, len(todo))]
        probs = {}
        for start in range(0, len(todo), self.batch):
            self._check_cancel()
            batch = todo[start:start + self.batch]
            feats = torch.stack([ctx.features.get(i, batch) for i in batch])
            for i, p in zip(batch, ctx.foreground(sup_feats, sup_masks, feats)):
                excluded = ctx.excluded(i)
                probs[i] = p if excluded is None else p.masked_fill(excluded, 0.0)
                self._on_step()
        walks = {}
        for span in self.spans:
            w = Walk(painted_area=float(self.painted_masks[span.start].sum()), steps=len(span.slices))
            band = intensity_band(ctx.slices.one(span.start), self.painted_masks[span.start].numpy() > 0.5)
            min_area = self._min_area(w.painted_area)
            for k, i in enumerate(span.slices):
                mask = (probs[i] >= self.options.threshold).numpy()
                area = float(mask.sum())
                if span.kind == "outward" and (area < min_area or intensity_agreement(
                        ctx.slices.one(i), mask, band) < self.options.min_intensity_agreement):
                    last = w.areas[span.slices[k - 1]] if k else w.painted_area
                    w.stop = {"slice": i, "reason": "area" if area < min_area else "intensity",
                              "area_fraction": last / max(w.painted_area, 1.0)}
                    break
                w.probs[i], w.areas[i] = probs[i], area
            walks[span] = [w, w] if span.kind == "between" else [w]
        return walks

    def _in_plane_spacings(self) -> list:
        """The painted plane's two pixel spacings (mm), in array order."""
        spacing = np.array(self.image.GetSpacing())[::-1]  # array order
        return [float(s) for a, s in enumerate(spacing) if a != self.axis_index]

    def _in_plane_spacing(self) -> float:
        """The painted plane's pixel size (mm; the geometric mean of its two spacings)."""
        rows, cols = self._in_plane_spacings()
        return float(np.sqrt(rows * cols))

    def _search_radius_px(self, prepared) -> Optional[int]:
        if self.options.search_margin_mm is None:
            return None
        pixel_mm = getattr(prepared.sampler, "model_spacing", None)
        if pixel_mm is None:
            in_plane = self._in_plane_spacings()
            shape = [d for a, d in enumerate(self.support.shape) if a != self.axis_index]
            pixel_mm = max(shape[0] * in_plane[0], shape[1] * in_plane[1]) / prepared.size
        return max(1, int(round(self.options.search_margin_mm / float(pixel_mm))))


def averaged(first: dict, second: dict, weight: float) -> dict:
    """(1 - weight) first + weight second, slice by slice; a slice one of them did not
    reach counts as 0 there."""
    return {i: sum(w * side[i] for w, side in ((1 - weight, first), (weight, second)) if i in side)
            for i in sorted(set(first) | set(second))}


def propagate(image: sitk.Image, support: np.ndarray, model, options: PropagationOptions | None = None,
              progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCallback] = None,
              exclude: Optional[np.ndarray] = None,
              session: Optional[PropagationSession] = None,
              editable: Optional[np.ndarray] = None) -> PropagationResult:
    """Propagate the painted ``support`` (bool, volume array order) through ``image``.

    ``model`` is a `checkpoints.LoadedCheckpoint` (its pre-processing is used); not used
    in ``registration`` mode. ``exclude`` (bool, same shape): voxels that are never in the
    result; a slice holding only excluded voxels is an end anchor. ``editable`` (bool, same
    shape; Slicer's editable area): outside it, voxels are never in the result and walks do
    not carry the mask through them, but a slice is not thereby an end. ``session``: pass
    the same `PropagationSession` to every run on one image to recompute only what changed.
    """
    options = options or PropagationOptions()
    return Propagator(image, support, model, options, progress, cancel, exclude, session, editable).run()


__all__ = ["PropagationOptions", "PropagationResult", "PropagationSession", "PropagationCancelled",
           "SliceSuggestion", "propagate", "resolve_axis", "resolve_device", "MODES"]
