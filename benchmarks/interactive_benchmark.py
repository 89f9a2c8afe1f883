"""Interactive benchmark: a simulated user paints slices until the structure is right.

Round 0 paints the structure's largest slice (its true mask). After each propagation the
user looks at the result and corrects the slice with the most wrong voxels (result XOR
truth, slices already painted or excluded are not candidates): if the structure is present
there in truth, its true mask is painted (a new anchor); if it is absent, the whole slice is
marked "structure absent" (an exclusion of every voxel of that slice, an end anchor for the
engine). Each correction counts as one painted slice. We report mean 3D Dice over the whole
volume after 1, 2, 3, 4 and 6 painted slices and the seconds per (re)propagation. Slices
are taken across the volume's axial axis (the slice axis of every volume used here), or
with ``--plane coronal|sagittal`` across the index axis nearest that direction: the user
paints in another view and the engine finds the plane from the painting.

Methods (``--methods``, comma-separated):

* ``fewshot``: the engine (`FewShotSegLib.propagation.propagate`, shipped default model,
  default `PropagationOptions`), one `PropagationSession` per structure reused between
  rounds, so rounds after the first are incremental re-propagations.
* ``suggest``: the same engine, but the user corrects the slice the tool suggests
  (``result.suggestions[0].slice``) instead of the worst slice. When there is no suggestion,
  or it names a slice already painted or excluded, the user falls back to the worst slice
  (counted as ``suggest_fallbacks``).
* ``learned``: the engine in ``mode="learned"``: registration carries the mask and the
  walk's step network (``--stepper``, default the shipped ``fewshotseg-propagator``)
  corrects it at every step; worst-slice user.
* ``learned_suggest``: the engine in ``mode="learned"`` (the shipped default), with the user
  who corrects the slice the tool suggests, as ``suggest``.
* ``registration_suggest``: registration mode with the user who follows the suggestions.
* ``learned_top3``: the engine in ``mode="learned"``, with a user who looks at the three
  slices the tool lists first (the command prints three, Slicer lists them with *Next*) and
  corrects the one where the result is most wrong (falling back as ``suggest``).
* ``registration``: the engine's non-learned comparator, ``PropagationOptions(mode=
  "registration")``, with the worst-slice user.
* ``fill``: 3D Slicer's *Fill between slices*: ITK's MorphologicalContourInterpolator
  (PyPI ``itk-morphologicalcontourinterpolation``) called as Slicer's
  ``vtkITKMorphologicalContourInterpolator`` calls it: label 0 (every label), axis -1 (all
  axes, the filter finds the painted slices itself), heuristic alignment on, repeated
  dilations (``UseDistanceTransform`` off, vtkITK's default; ITK's own default is on) with
  the cross structuring element. With one painted slice it returns that slice; it never
  extrapolates past the outermost painted slices. Fill between slices has no way to say
  "absent here" (it only interpolates between painted slices, and its result is never
  outside them), so its user picks the worst slice among the slices where the structure
  exists in truth; absent-slice corrections never arise. Measured this way on the 20 CHAOS
  cases the baseline reproduces the figures measured elsewhere (0.193 / 0.369 / 0.501 /
  0.613 / 0.765 for 1 / 2 / 3 / 4 / 6 slices): see ``benchmarks/results/interactive_*.json``.
  This user mostly paints the neighbours of the painted slices (the slices with the most
  missed voxels), which gives the interpolation nothing to fill.
* ``fill_spaced``: Fill between slices with a user who follows the effect's own advice
  ("always leave at least one empty slice between segmented slices"): the worst slice not
  next to a painted one (the worst slice at all when none is left). A stronger baseline.

If a result is already perfect (no wrong voxel outside the painted slices) the user stops;
the later counts keep that Dice. A propagation that raises is recorded as an error and its
result taken as the painted slices alone.

Data (``--dataset``): ``chaos`` = CHAOS-T2 MRI, 20 cases x 4 organs (liver, right kidney,
left kidney, spleen), manual labels. ``totalseg`` = the TotalSegmentator CT example
``totalseg/ct_abdomen_3mm`` (3 mm isotropic, 112 axial slices; labels are TotalSegmentator's
model output, so Dice there is agreement with it). ``totalseg_mr`` = the TotalSegmentator MR example ``totalseg/mr_small_3mm`` (20 axial
slices of 3 mm), every structure of ``TOTALSEG_MR_STRUCTURES`` (>= 1000 voxels).
``dev`` (for choosing settings; never reported as a result) = the ten CHAOS cases the step
network trained on, and ``dev_ct``: the scored CT structures (>= 1000 voxels) on the two
other TotalSegmentator CT examples, which no network here trained on; ``dev_ct_all``: every
class labelled there (>= 1000 voxels: 45 structures, colon, small bowel, lungs and ribs included).
Chosen CT structures: the 14 of
``TOTALSEG_STRUCTURES`` -- the four CHAOS organs, stomach, duodenum, urinary bladder,
vertebra L3, aorta, inferior vena cava, left hip bone, left gluteus maximus, left
autochthon, left iliopsoas: every one spans >= 15 axial slices and >= 2000 voxels, one side
of each left/right pair, colon and small bowel left out (tubes that leave and re-enter the
slab), capped at 14 so a run fits in minutes.

``--tilt DEGREES``: every scan and label resampled (linear, nearest) onto a grid of the same
spacing whose slices are tilted by that angle about the scan's row direction: an oblique
stack, as a reformat makes one (thick slices come out blurred across).

``--invert``: every image's intensities turned upside down (max - value) before the user
paints: a stand-in for a contrast the networks never saw (bright structures dark, dark ones
bright, as between T1 and T2 MRI). A robustness probe; it says nothing about such scans.

Output (``--out``, default ``benchmarks/results/interactive_<dataset>.json``): per dataset
and method the mean Dice at 1, 2, 3, 4, 6 painted slices (and per organ), mean seconds of
the first propagation and of re-propagations, counts (structures, exclusions, errors,
Dice drops after a correction), hardware, date, settings, and one compact record per
structure. Written after every structure; a rerun with the same ``--out`` skips the
structures (x method) already there (resume).

    python benchmarks/interactive_benchmark.py --dataset chaos --methods fill
    nohup python benchmarks/interactive_benchmark.py --dataset both --methods fewshot,suggest,registration &
    python benchmarks/interactive_benchmark.py --dataset chaos --methods fewshot --option threshold=0.6 --out /tmp/t06.json
    python benchmarks/interactive_benchmark.py --plot        # -> benchmarks/results/interactive.png
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("fewshot", "suggest", "learned", "learned_suggest", "learned_top3", "registration", "registration_suggest", "fill",
           "fill_spaced")
SUGGEST_METHODS = ("suggest", "learned_suggest", "registration_suggest", "learned_top3")
FILL_METHODS = ("fill", "fill_spaced")
REPORT_COUNTS = (1, 2, 3, 4, 6)
# Fill between slices on the 20 CHAOS-T2 cases x 4 organs, measured elsewhere (issue #34)
FILL_REFERENCE_CHAOS = {1: 0.193, 2: 0.369, 3: 0.501, 4: 0.613, 6: 0.765}
TARGETS = {2: 0.90, 6: 0.95}
CHAOS_ORGANS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
TOTALSEG_CASE = "ct_abdomen_3mm"
TOTALSEG_STRUCTURES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6,
                       "duodenum": 19, "urinary_bladder": 21, "vertebrae_L3": 29, "aorta": 52,
                       "inferior_vena_cava": 63, "hip_left": 77, "gluteus_maximus_left": 80,
                       "autochthon_left": 86, "iliopsoas_left": 88}
TOTALSEG_MR_CASE = "mr_small_3mm"
TOTALSEG_MR_STRUCTURES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5,
                          "stomach": 6, "pancreas": 7, "colon": 15, "vertebrae": 19, "autochthon_left": 46,
                          "autochthon_right": 47}
# for choosing settings, never reported as a result: the scored CT structures (>= 1000
# voxels) on the two other TotalSegmentator CT examples; the step network never saw them
DEV_CT_CASES = ("ct_small_3mm", "ct_dicom")
DEV_CHAOS = ("1", "2", "3", "5", "8", "10", "13", "15", "19", "20")
# the CHAOS cases whose labels the shipped step network never saw (it trained on the other ten)
CHAOS_HELD_OUT = ("21", "22", "31", "32", "33", "34", "36", "37", "38", "39")
QUICK_CASES = ("1", "2")
# the README's figure: a later file's methods replace an earlier one's for the same dataset
PLOTTED = ("chaos", "totalseg", "learned_totalseg", "totalseg_mr")


# ----------------------------------------------------------------------------- data
def chaos_structures(data_dir: Path, cases=None, organs=None):
    from FewShotSegLib.evaluation import chaos_cases, load_chaos_case
    organs = organs or list(CHAOS_ORGANS)
    for case in cases or chaos_cases(data_dir):
        image, label = load_chaos_case(data_dir, case)
        for organ in organs:
            value = CHAOS_ORGANS[organ]
            yield "chaos", case, organ, image, label == value, lambda v=value: np.isin(
                label, [x for x in CHAOS_ORGANS.values() if x != v])


def totalseg_structures(data_dir: Path, organs=None, dataset: str = "totalseg"):
    from FewShotSegLib.evaluation import label_array
    from FewShotSegLib.imageio import read_image
    folder = data_dir / "totalseg"
    if dataset in ("dev_ct", "dev_ct_all"):
        table = TOTALSEG_STRUCTURES
        if dataset == "dev_ct_all":   # every class TotalSegmentator labels, colon and bowel included
            names = json.loads((folder / "labels_total.json").read_text())
            table = {name: int(value) for value, name in names.items()}
        for case in DEV_CT_CASES:
            image = read_image(folder / case) if (folder / case).is_dir() else read_image(folder / f"{case}.nii.gz")
            label = label_array(folder / f"{case}_seg.nii.gz", image)
            for organ, value in table.items():
                if (organs is None or organ in organs) and int((label == value).sum()) >= 1000:
                    yield dataset, case, organ, image, label == value, lambda v=value, t=table: np.isin(
                        label, [x for x in t.values() if x != v])
        return
    case, table = (TOTALSEG_MR_CASE, TOTALSEG_MR_STRUCTURES) if dataset == "totalseg_mr" \
        else (TOTALSEG_CASE, TOTALSEG_STRUCTURES)
    image = read_image(folder / f"{case}.nii.gz")
    label = label_array(folder / f"{case}_seg.nii.gz", image)
    for organ in organs or list(table):
        if organ in table:
            yield dataset, case, organ, image, label == table[organ], lambda v=table[organ]: np.isin(
                label, [x for x in table.values() if x != v])


# ----------------------------------------------------------------------------- the user
def slice_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(mask, axis, 0)
    return moved.reshape(moved.shape[0], -1).sum(1, dtype=np.int64)


def worst_slice(pred: np.ndarray, truth: np.ndarray, axis: int, done: set, present_only: bool = False):
    """The slice with the most wrong voxels, not yet painted or excluded; None if none is wrong."""
    wrong = slice_counts(pred != truth, axis)
    if done:
        wrong[sorted(done)] = -1
    if present_only:
        wrong[slice_counts(truth, axis) == 0] = -1
    index = int(np.argmax(wrong))
    return index if wrong[index] > 0 else None


def inputs_for(truth: np.ndarray, axis: int, painted: list, absent: list):
    """The user's painting so far: true mask on painted slices, whole slices excluded."""
    support = np.zeros_like(truth, dtype=bool)
    s_moved, t_moved = np.moveaxis(support, axis, 0), np.moveaxis(truth, axis, 0)
    for i in painted:
        s_moved[i] = t_moved[i]
    exclude = None
    if absent:
        exclude = np.zeros_like(truth, dtype=bool)
        np.moveaxis(exclude, axis, 0)[absent] = True
    return support, exclude


# ----------------------------------------------------------------------------- methods
_ITK = None


def inverted(image):
    """The image with its intensities turned upside down (max - value), geometry kept."""
    import SimpleITK as sitk
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    out = sitk.GetImageFromArray(array.max() - array)
    out.CopyInformation(image)
    return out


def tilted_grid(image, degrees: float):
    """A grid of the image's spacing whose slices are tilted by ``degrees`` about the image's
    first index axis (its rows' direction), covering the whole image: an oblique stack."""
    import SimpleITK as sitk
    direction = np.array(image.GetDirection()).reshape(3, 3)
    axis = direction[:, 0] / np.linalg.norm(direction[:, 0])
    turn = np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(turn) * cross + (1 - np.cos(turn)) * cross @ cross   # Rodrigues
    new_direction = rotation @ direction
    spacing = np.array(image.GetSpacing())
    size = np.array(image.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    physical = np.array([image.TransformContinuousIndexToPhysicalPoint(c.astype(float).tolist()) for c in corners])
    frame = physical @ new_direction          # coordinates along the new axes (mm)
    low, high = frame.min(0), frame.max(0)
    grid = sitk.Image([int(n) for n in np.ceil((high - low) / spacing) + 1], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(new_direction.flatten().tolist())
    grid.SetOrigin((new_direction @ low).tolist())
    return grid


def tilted(image, degrees: float, truth: np.ndarray | None = None):
    """The image resampled (linear) onto ``tilted_grid``, outside the scan its minimum; with
    ``truth``, the structure's mask (nearest) on that grid instead."""
    import SimpleITK as sitk
    grid = tilted_grid(image, degrees)
    if truth is not None:
        mask = sitk.GetImageFromArray(truth.astype(np.uint8))
        mask.CopyInformation(image)
        moved = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        return sitk.GetArrayFromImage(moved).astype(bool)
    low = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, low)


def load_itk(threads: int | None = None):
    """The ITK module with MorphologicalContourInterpolator, or None when it is not installed."""
    global _ITK
    if _ITK is None:
        try:
            import itk
            itk.MorphologicalContourInterpolator  # noqa: B018 - the remote module loads lazily
        except (ImportError, AttributeError):
            return None
        if threads:
            itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
        _ITK = itk
    return _ITK


def fill_between_slices(support: np.ndarray, spacing) -> np.ndarray:
    """Slicer's Fill between slices on a binary painting (see the module docstring)."""
    itk = load_itk()
    if itk is None:
        raise RuntimeError("Fill between slices needs: pip install itk-morphologicalcontourinterpolation")
    image = itk.image_from_array(np.ascontiguousarray(support, dtype=np.uint8))
    image.SetSpacing([float(s) for s in spacing])
    interpolator = itk.MorphologicalContourInterpolator.New(image)
    interpolator.SetLabel(0)
    interpolator.SetAxis(-1)
    interpolator.SetHeuristicAlignment(True)
    interpolator.SetUseDistanceTransform(False)
    interpolator.SetUseBallStructuringElement(False)
    interpolator.Update()
    out = itk.array_from_image(interpolator.GetOutput()) > 0
    del interpolator, image
    return out


class EngineRunner:
    """One (re)propagation of the engine; a session per structure (incremental rounds)."""

    def __init__(self, image, model, mode: str, extra: dict | None = None, editable=None):
        from FewShotSegLib.propagation import PropagationOptions, PropagationSession
        self.image, self.model, self.editable = image, model, editable
        extra = dict(extra or {})
        if mode != "chained":
            extra["mode"] = mode
        self.options = PropagationOptions(**extra)
        self.session = PropagationSession()

    def __call__(self, support, exclude):
        from FewShotSegLib.propagation import propagate
        result = propagate(self.image, support, self.model, self.options, exclude=exclude, session=self.session,
                           editable=self.editable)
        return result.mask.astype(bool), result


def run_structure(method: str, image, truth: np.ndarray, axis: int, rounds: int, model=None,
                  options: dict | None = None, editable: np.ndarray | None = None, cut: bool = False) -> dict:
    """One simulated user on one structure; returns the compact record. ``editable``: the
    voxels the result may hold (Slicer's editable area; the engine's walks stay inside it,
    or with ``cut`` its result is cut to it when written; Fill between slices is cut)."""
    from FewShotSegLib.metrics import dice
    areas = slice_counts(truth, axis)
    if areas.max() == 0:
        raise ValueError("the structure is empty")
    painted, absent = [int(np.argmax(areas))], []
    dices, seconds, picks, wrong = [], [], [painted[0]], []
    errors, fallbacks, axis_mismatch = 0, 0, 0
    spacing = image.GetSpacing()
    mode = {"registration": "registration", "registration_suggest": "registration", "learned": "learned",
            "learned_suggest": "learned", "learned_top3": "learned"}.get(method, "chained")
    runner = None if method in FILL_METHODS else EngineRunner(image, model, mode, options, None if cut else editable)
    for r in range(rounds):
        support, exclude = inputs_for(truth, axis, painted, absent)
        result = None
        start = time.perf_counter()
        try:
            if method in FILL_METHODS:
                pred = fill_between_slices(support, spacing)
                if editable is not None:
                    pred &= editable | support
            else:
                pred, result = runner(support, exclude)
                if cut and editable is not None:
                    pred &= editable | support
                if getattr(result, "axis_index", axis) != axis:
                    axis_mismatch += 1
        except Exception as exc:  # noqa: BLE001 - recorded, the user goes on
            errors += 1
            print(f"    round {r}: {type(exc).__name__}: {exc}", flush=True)
            pred = support.copy()
        seconds.append(time.perf_counter() - start)
        dices.append(dice(pred, truth))
        fp = pred & ~truth
        outside = int(slice_counts(fp, axis)[areas == 0].sum())
        wrong.append([outside, int(fp.sum()) - outside, int((truth & ~pred).sum())])
        if r == rounds - 1:
            break
        done = set(painted) | set(absent)
        nxt = None
        if method in SUGGEST_METHODS and result is not None:
            listed = [int(s.slice) for s in (result.suggestions or [])[:3 if method == "learned_top3" else 1]]
            listed = [i for i in listed if i not in done]
            if listed:
                errors_per_slice = slice_counts(pred != truth, axis)
                nxt = max(listed, key=lambda i: errors_per_slice[i])
            if nxt is None:
                fallbacks += 1
        if nxt is None:
            if method == "fill_spaced":  # Slicer's advice: leave an empty slice between painted ones
                near = {j for i in painted for j in (i - 1, i, i + 1)}
                nxt = worst_slice(pred, truth, axis, done | near, present_only=True)
            if nxt is None:
                nxt = worst_slice(pred, truth, axis, done, present_only=method in FILL_METHODS)
        if nxt is None:  # nothing left to correct: the user stops
            wrong += [wrong[-1]] * (rounds - len(dices))
            dices += [dices[-1]] * (rounds - len(dices))
            break
        if areas[nxt] > 0:
            painted.append(nxt)
            picks.append(nxt)
        else:
            absent.append(nxt)
            picks.append(-1 - nxt)  # negative: marked absent
    drops = int(sum(b < a - 1e-6 for a, b in zip(dices, dices[1:])))
    return {"dice": [round(float(d), 4) for d in dices], "seconds": [round(s, 3) for s in seconds],
            "picks": picks, "wrong": wrong, "slices": int(truth.shape[axis]), "extent": int((areas > 0).sum()),
            "errors": errors, "fallbacks": fallbacks, "drops": drops, "axis_mismatch": axis_mismatch}


# ----------------------------------------------------------------------------- output
def hardware(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "threads": threads, "python": platform.python_version()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def summarise(records: list) -> dict:
    """Per dataset, per method: mean Dice at each painted count (over structures), per organ too."""
    out = {}
    for dataset in sorted({r["dataset"] for r in records}):
        methods = {}
        for method in [m for m in METHODS if any(r["method"] == m and r["dataset"] == dataset for r in records)]:
            rs = [r for r in records if r["dataset"] == dataset and r["method"] == method]
            rounds = min(len(r["dice"]) for r in rs)
            counts = [c for c in REPORT_COUNTS if c <= rounds]
            mean = {str(c): round(float(np.mean([r["dice"][c - 1] for r in rs])), 4) for c in counts}
            organs = sorted({r["organ"] for r in rs}, key=lambda o: list(CHAOS_ORGANS).index(o)
                            if o in CHAOS_ORGANS else 99)
            per_organ = {o: {str(c): round(float(np.mean([r["dice"][c - 1] for r in rs if r["organ"] == o])), 4)
                             for c in counts} for o in organs}
            first = [r["seconds"][0] for r in rs]
            again = [s for r in rs for s in r["seconds"][1:]]
            methods[method] = {
                "structures": len(rs), "mean_dice": mean, "dice_per_organ": per_organ,
                "seconds_first": round(float(np.mean(first)), 3),
                "seconds_repropagation": round(float(np.mean(again)), 3) if again else None,
                "exclusions": int(sum(p < 0 for r in rs for p in r["picks"])),
                "dice_drops": int(sum(r["drops"] for r in rs)),
                "dice_drops_after_paint": _drops(rs, paint=True),
                "dice_drops_after_exclusion": _drops(rs, paint=False),
                "wrong_voxels": _wrong(rs, counts),
                "errors": int(sum(r["errors"] for r in rs)),
                "suggest_fallbacks": int(sum(r["fallbacks"] for r in rs)) if method in SUGGEST_METHODS else None,
                "axis_mismatch": int(sum(r["axis_mismatch"] for r in rs)),
            }
        out[dataset] = methods
    return out


def _drops(rs: list, paint: bool) -> int:
    """Corrections (painted slice, or slice marked absent) after which the Dice fell."""
    return int(sum(b < a - 1e-6 and ((r["picks"][i + 1] >= 0) == paint)
                   for r in rs for i, (a, b) in enumerate(zip(r["dice"], r["dice"][1:]))))


def _wrong(rs: list, counts: list) -> dict | None:
    """Mean wrong voxels per structure after N painted slices: false positives on slices where
    the structure is absent (a walk ran past its end), false positives where it is present,
    false negatives."""
    rs = [r for r in rs if "wrong" in r]
    if not rs:
        return None
    names = ("fp_where_absent", "fp_where_present", "fn")
    return {str(c): {n: round(float(np.mean([r["wrong"][c - 1][k] for r in rs])), 1) for k, n in enumerate(names)}
            for c in counts}


def write_results(path: Path, settings: dict, records: list, threads: int) -> None:
    head = {
        "benchmark": "interactive: simulated user paints the largest slice, then the worst slice each round "
                     "(true mask, or the whole slice marked absent); 3D Dice after N painted slices",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(), "hardware": hardware(threads), "settings": settings,
        "reference_fill_between_slices_chaos": {str(k): v for k, v in FILL_REFERENCE_CHAOS.items()},
        "targets": {str(k): v for k, v in TARGETS.items()},
        "summary": summarise(records),
    }
    text = json.dumps(head, indent=2)
    rows = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in records)
    text = text[:-2] + ',\n  "structures": [\n' + rows + "\n  ]\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def print_summary(summary: dict) -> None:
    for dataset, methods in summary.items():
        print(f"{dataset}: mean Dice after N painted slices")
        for method, s in methods.items():
            cells = "  ".join(f"{c}: {v:.3f}" for c, v in s["mean_dice"].items())
            again = s["seconds_repropagation"]
            print(f"  {method:12s} n={s['structures']:3d}  {cells}  first {s['seconds_first']:.2f} s, "
                  f"again {again if again is None else round(again, 2)} s")


# ----------------------------------------------------------------------------- plot
def plot(paths: list, out_png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summaries = {}
    for path in paths:
        for dataset, methods in json.loads(Path(path).read_text())["summary"].items():
            for method, s in methods.items():
                summaries.setdefault(dataset, {})[method] = s  # later files win
    datasets = [d for d in ("chaos", "totalseg") if d in summaries] + \
               [d for d in summaries if d not in ("chaos", "totalseg")]
    titles = {"chaos": "CHAOS-T2 MRI (manual labels)", "totalseg": "TotalSegmentator CT (agreement)",
              "totalseg_mr": "TotalSegmentator MR (agreement)"}
    labels = {"fewshot": "few-shot model, worst slice", "suggest": "few-shot model, its own suggestion",
              "learned": "step network, worst slice", "learned_suggest": "step network, its own suggestion",
              "learned_top3": "step network, the worst of its first three suggestions",
              "registration": "registration mode, worst slice", "registration_suggest": "registration, its own suggestion",
              "fill": "Fill between slices (ITK MCI)",
              "fill_spaced": "Fill between slices, spaced slices"}
    styles = {"learned": "C5P-", "learned_suggest": "C6X--", "learned_top3": "C8o--", "registration_suggest": "C7v:", "fewshot": "C0o-", "suggest": "C2s-", "registration": "C1^-", "fill": "C3D-", "fill_spaced": "C4v--"}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in METHODS:
            s = summaries[dataset].get(method)
            if not s:
                continue
            xs = [int(c) for c in s["mean_dice"]]
            ax.plot(xs, list(s["mean_dice"].values()), styles[method], label=f"{labels[method]} (n={s['structures']})")
        if dataset == "chaos":
            ax.plot(list(FILL_REFERENCE_CHAOS), list(FILL_REFERENCE_CHAOS.values()), "k:", marker="x",
                    label="Fill between slices, reference")
        ax.plot(list(TARGETS), list(TARGETS.values()), "k*", markersize=11, linestyle="none", label="targets")
        ax.set_title(titles.get(dataset, dataset))
        ax.set_xlabel("painted slices")
        ax.set_ylabel("mean 3D Dice")
        ax.set_xticks(list(REPORT_COUNTS))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="chaos", choices=["chaos", "totalseg", "totalseg_mr", "both", "all", "dev", "dev_ct",
                                                      "dev_ct_all"],
                        help="dev / dev_ct: data for choosing settings (CHAOS cases the step network trained "
                             "on, CT scans and structures never reported), not results; dev_ct_all: every "
                             "labelled class of those CT scans (>= 1000 voxels), colon and bowel included")
    parser.add_argument("--cases", default=None, help="comma-separated CHAOS ids (default: all 20)")
    parser.add_argument("--organs", default=None, help="comma-separated structure names (default: all)")
    parser.add_argument("--methods", default="fewshot,fill", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--rounds", type=int, default=6, help="painted slices at the end (default 6)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/interactive_<dataset>.json)")
    parser.add_argument("--quick", action="store_true", help=f"CHAOS cases {','.join(QUICK_CASES)} x liver (unless --cases / --organs say otherwise)")
    parser.add_argument("--model", default=None, help="checkpoint name or path (default: the shipped model)")
    parser.add_argument("--stepper", default=None, help="step network for method learned (default: the shipped one)")
    parser.add_argument("--data", default=None, help="shared data folder (default ../shared/data)")
    parser.add_argument("--threads", type=int, default=1, help="torch / ITK threads (default 1)")
    parser.add_argument("--invert", action="store_true",
                        help="invert every image's intensities (a contrast no network here saw)")
    parser.add_argument("--tilt", type=float, default=0.0, metavar="DEGREES",
                        help="resample every scan and label onto slices tilted by this angle (an oblique stack)")
    parser.add_argument("--plane", default="axial", choices=["axial", "coronal", "sagittal"],
                        help="the plane the user paints in (default axial; the engine finds it from the painting)")
    parser.add_argument("--neighbours", default=None, choices=["walk", "cut"],
                        help="the user has segmented the set's other structures of each scan and edits outside "
                             "them (Slicer's editable area 'outside all segments'; their true masks): walk = the "
                             "walks stay outside them (the engine's editable area), cut = the result is cut when "
                             "written (what masking alone does)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a PropagationOptions field for the engine's users, e.g. threshold=0.6 (repeatable)")
    parser.add_argument("--plot", nargs="*", default=None, metavar="JSON",
                        help="render benchmarks/results/interactive.png from these JSON files "
                             "(default: benchmarks/results/interactive_<name>.json for PLOTTED) and exit")
    parser.add_argument("--png", default=str(RESULTS / "interactive.png"))
    args = parser.parse_args(argv)

    if args.plot is not None:
        paths = args.plot or [RESULTS / f"interactive_{name}.json" for name in PLOTTED
                              if (RESULTS / f"interactive_{name}.json").is_file()]
        print(plot(paths, Path(args.png)))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.neighbours and (args.tilt or args.invert):
        parser.error("--neighbours is measured on the scans as stored (not with --tilt or --invert)")
    from FewShotSegLib.propagation import PropagationOptions
    extra = {}
    for item in args.option:
        key, _, value = item.partition("=")
        if key not in PropagationOptions.__dataclass_fields__ or key == "mode":
            parser.error(f"--option {key}: not a PropagationOptions field (mode is chosen by --methods)")
        low = value.strip().lower()
        if low in ("none", "true", "false"):
            extra[key] = {"none": None, "true": True, "false": False}[low]
        else:
            try:
                extra[key] = float(value)
            except ValueError:
                extra[key] = value
    try:
        PropagationOptions(**extra).validate()
    except Exception as exc:  # noqa: BLE001 - FewShotSegError, TypeError
        parser.error(f"--option: {exc}")
    import torch
    torch.set_num_threads(args.threads)
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    from FewShotSegLib.evaluation import shared_data_dir
    from FewShotSegLib.imageio import array_axis_for
    if set(methods) & set(FILL_METHODS) and importlib.util.find_spec("itk") is None:
        parser.error("method fill needs ITK's contour interpolator: pip install itk-morphologicalcontourinterpolation")
    data_dir = shared_data_dir(args.data)

    cases = args.cases.split(",") if args.cases else (list(QUICK_CASES) if args.quick else None)
    organs = args.organs.split(",") if args.organs else (["liver"] if args.quick else None)
    if args.dataset == "dev" and not args.cases:
        cases = list(DEV_CHAOS)
    datasets = {"both": ["chaos", "totalseg"], "all": ["chaos", "totalseg", "totalseg_mr"],
                "dev": ["chaos", "dev_ct"]}.get(
        args.dataset, [args.dataset])
    out = Path(args.out) if args.out else RESULTS / f"interactive_{args.dataset}{'_quick' if args.quick else ''}.json"
    settings = {"rounds": args.rounds, "user": "largest slice, then the worst slice (fill: worst slice where "
                "present; suggest: suggestions[0]; top3: the most wrong of suggestions[:3])", "model": args.model or "shipped default",
                "stepper": args.stepper or "shipped default",
                "options": ("PropagationOptions() defaults" if not extra else f"PropagationOptions(**{extra})")
                + "; registration: mode='registration'",
                "intensities": "inverted (max - value)" if args.invert else "as stored",
                "plane": args.plane,
                "tilt_degrees": args.tilt,
                "editable": f"outside the set's other structures (true masks), {args.neighbours}"
                            if args.neighbours else "everywhere",
                "fill": "itk MorphologicalContourInterpolator label 0, axis -1, heuristic alignment, "
                        "UseDistanceTransform off, cross element (Slicer's vtkITK settings)"}
    records = []
    if out.is_file():
        previous = json.loads(out.read_text())
        if previous.get("settings", {}).get("rounds") != args.rounds:
            parser.error(f"{out} holds a run with another --rounds; choose another --out")
        if previous.get("settings", {}).get("options") != settings["options"]:
            parser.error(f"{out} holds a run with other engine options; choose another --out")
        if previous.get("settings", {}).get("intensities", "as stored") != settings["intensities"]:
            parser.error(f"{out} holds a run on {previous['settings'].get('intensities', 'as stored')} "
                         "intensities; choose another --out")
        if previous.get("settings", {}).get("tilt_degrees", 0.0) != args.tilt:
            parser.error(f"{out} holds a run on slices tilted by {previous['settings'].get('tilt_degrees', 0.0)} "
                         "degrees; choose another --out")
        if previous.get("settings", {}).get("plane", "axial") != args.plane:
            parser.error(f"{out} holds a run painted in the {previous['settings'].get('plane', 'axial')} plane; "
                         "choose another --out")
        if previous.get("settings", {}).get("editable", "everywhere") != settings["editable"]:
            parser.error(f"{out} holds a run with another editable area; choose another --out")
        records = previous.get("structures", [])
        print(f"resuming {out}: {len(records)} records there", flush=True)
    have = {(r["dataset"], r["case"], r["organ"], r["method"]) for r in records}

    model = stepper = None  # loaded at the first structure that needs it (a resumed run may need none)

    def structures():
        for dataset in datasets:
            if dataset == "chaos":
                organ_list = [o for o in organs if o in CHAOS_ORGANS] if organs else None
                if organ_list != []:
                    yield from chaos_structures(data_dir, cases, organ_list)
            else:
                yield from totalseg_structures(data_dir, organs, dataset)

    start = time.perf_counter()
    flipped = [None, None]   # --invert: (image as read, inverted)
    turned = [None, None]    # --tilt: (image as read, tilted)
    for dataset, case, organ, image, truth, others in structures():
        editable = ~others() if args.neighbours else None
        cut = args.neighbours == "cut"
        if args.tilt:
            if turned[0] is not image:
                turned[:] = [image, tilted(image, args.tilt)]
            truth = tilted(image, args.tilt, truth)
            image = turned[1]
        axis = array_axis_for(image, args.plane)
        if args.invert:   # the CT and MR examples give many structures of one image: invert it once
            if flipped[0] is not image:
                flipped[:] = [image, inverted(image)]
            image = flipped[1]
        for method in methods:
            if (dataset, case, organ, method) in have:
                continue
            if method in ("fewshot", "suggest") and model is None:
                from FewShotSegLib.checkpoints import load_checkpoint
                from FewShotSegLib.model_store import resolve_model_path
                model = load_checkpoint(resolve_model_path(args.model), device="cpu")
            if method in ("learned", "learned_suggest", "learned_top3") and stepper is None:
                from FewShotSegLib.checkpoints import load_for_mode
                stepper = load_for_mode(args.stepper, "learned")
            if method in FILL_METHODS:
                load_itk(args.threads)
            record = {"dataset": dataset, "case": case, "organ": organ, "method": method}
            record.update(run_structure(method, image, truth, axis, args.rounds,
                                        stepper if method in ("learned", "learned_suggest", "learned_top3") else model, extra,
                                        editable, cut))
            records.append(record)
            write_results(out, settings, records, args.threads)
            print(f"{dataset} {case:>14s} {organ:20s} {method:12s} Dice "
                  + " ".join(f"{d:.3f}" for d in record["dice"])
                  + f"  ({np.mean(record['seconds']):.2f} s/run, picks {record['picks']})", flush=True)
    if records:
        write_results(out, settings, records, args.threads)
        print_summary(summarise(records))
    print(f"{out} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # ITK's Python wrapping can abort while the interpreter tears down (heap check at exit,
    # seen once on this machine after the results were written); skip the teardown.
    os._exit(code)
