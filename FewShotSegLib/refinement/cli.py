"""`fewshotseg refine`: refine a coarse mask with the diffusion refiner, optionally write
its uncertainty. The lead wires `add_refine_parser` into `FewShotSegLib/cli.py`."""
from __future__ import annotations

import sys

from ..errors import FewShotSegError
from ..progress import progress_bar


def cmd_refine(args) -> int:
    import numpy as np
    import SimpleITK as sitk

    from ..checkpoints import load_checkpoint
    from ..imageio import check_outputs, label_image_like, read_image, read_mask_like, select_label, write_images
    from ..model_store import DEFAULT_REFINER, resolve_model_path
    from .sampling import RefineOptions, refine

    inputs = [p for p in (args.image, args.mask, args.keep) if p]
    outputs = [p for p in (args.output, args.uncertainty, args.probability) if p]
    check_outputs(outputs, inputs)            # before any work: never overwrite an input, nor one output another
    options = RefineOptions(samples=args.samples, steps=args.steps, start_t=args.start_t, seed=args.seed,
                            axis=args.axis, margin_mm=args.margin_mm, device=args.device,
                            uncertainty=args.uncertainty_kind, num_threads=args.threads,
                            neighbours=not args.no_neighbours)
    options.validate()                        # bad K / steps fail before the files are read
    image = read_image(args.image)
    coarse_img = read_mask_like(args.mask, image, "coarse mask")          # another grid: resampled (nearest)
    coarse_arr = sitk.GetArrayViewFromImage(coarse_img)
    coarse = select_label(coarse_arr, args.label)
    value = args.label if args.label else int(coarse_arr[coarse].max())  # keep the label value
    keep = None
    if args.keep:
        keep = sitk.GetArrayFromImage(read_mask_like(args.keep, image, "kept-slices mask")) != 0
    refiner = load_checkpoint(resolve_model_path(args.model, default=DEFAULT_REFINER),
                              expect_kind="refiner", device="cpu")
    update, close = progress_bar(not args.quiet)
    try:
        result = refine(image, coarse, refiner, options, progress=update, keep=keep)
    finally:
        close()
    images = [(label_image_like(result.mask.astype(np.uint8 if value < 256 else np.uint32) * value, image), args.output)]
    for path, array in ((args.uncertainty, result.uncertainty), (args.probability, result.probability)):
        if path:
            img = sitk.GetImageFromArray(array.astype(np.float32))
            img.CopyInformation(image)
            images.append((img, path))
    from ..cli import _WRITTEN
    write_images(images, inputs=inputs, written=_WRITTEN)
    print(f"{result.slices_done} slices refined in {result.seconds:.2f} s "
          f"({result.seconds_per_slice:.2f} s per slice, K={options.samples}, {options.steps} steps) -> {args.output}")
    return 0


def add_refine_parser(subparsers):
    """Register `fewshotseg refine IMAGE --mask COARSE -o OUT [...]`."""
    p = subparsers.add_parser("refine", help="refine a coarse mask (diffusion refiner) and estimate its uncertainty")
    p.add_argument("image", help="image file (NIfTI, NRRD, MHA) or DICOM series folder")
    p.add_argument("--mask", required=True, help="coarse label file (e.g. a propagation); other grids are resampled")
    p.add_argument("--label", type=int, default=None, help="label value to refine (needed when several)")
    p.add_argument("-o", "--output", required=True, help="refined label file")
    p.add_argument("--keep", default=None,
                   help="label file of the painted slice(s): those slices are kept exactly as painted")
    p.add_argument("--uncertainty", default=None, help="also write the per-voxel uncertainty (float32)")
    p.add_argument("--probability", default=None, help="also write the mean foreground probability")
    p.add_argument("--uncertainty-kind", default="variance", choices=["variance", "entropy"])
    p.add_argument("--samples", type=int, default=4, help="K samples (ensemble size), 1..32")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps per sample, 1..50")
    p.add_argument("--start-t", type=float, default=0.5, help="noise level the coarse mask starts from (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margin-mm", type=float, default=10.0, help="crop margin around the coarse mask")
    p.add_argument("--no-neighbours", action="store_true",
                   help="do not refine the empty slice beyond each end of the coarse mask")
    p.add_argument("--model", default=None, help="refiner name (see `fewshotseg models`) or .pt file")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_refine)
    return p


def main(argv=None) -> int:
    """Standalone entry (tests, or before the lead wires the sub-command)."""
    import argparse
    parser = argparse.ArgumentParser(prog="fewshotseg")
    add_refine_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FewShotSegError as exc:
        print(f"fewshotseg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
