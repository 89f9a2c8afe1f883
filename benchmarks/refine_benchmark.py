"""Does refinement help? Propagate vs propagate + refine on CHAOS-T2, product protocol.

Support = the organ's largest slice, propagation by the few-shot model (or registration)
through `evaluation.score_structure`, then `refinement.refine` on the propagated mask.
Reports 3D Dice and HD95 before/after per organ and mean, the AUROC of the uncertainty
for wrongly labelled voxels (inside the refined region), the time per refined slice, and
a PNG of image / coarse / refined / uncertainty. Cases default to the refiner's held-out
cases (its checkpoint provenance), so the refiner never saw them.

    python benchmarks/refine_benchmark.py                       # default models
    python benchmarks/refine_benchmark.py --mode registration --cases 34,36
    python benchmarks/refine_benchmark.py --coarse perturbed    # synthetic damage, no propagation
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from FewShotSegLib.checkpoints import load_checkpoint  # noqa: E402
from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.evaluation import (CHAOS_ORGANS, chaos_cases, load_chaos_case,  # noqa: E402
                                      score_structure, shared_data_dir, write_json)
from FewShotSegLib.imageio import array_axis_for  # noqa: E402
from FewShotSegLib.metrics import dice, hd95  # noqa: E402
from FewShotSegLib.overview import save_figure  # noqa: E402
from FewShotSegLib.model_store import DEFAULT_MODEL, DEFAULT_REFINER, resolve_model_path  # noqa: E402
from FewShotSegLib.propagation import PropagationOptions  # noqa: E402
from FewShotSegLib.refinement.perturb import degrade_mask  # noqa: E402
from FewShotSegLib.refinement.sampling import RefineOptions, refine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN without both classes."""
    from scipy.stats import rankdata
    labels = labels.astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def perturbed_coarse(truth: np.ndarray, axis_index: int, seed: int) -> np.ndarray:
    """Slice-wise synthetic damage of the label (the refiner's training distribution)."""
    rng = np.random.default_rng(seed)
    moved = np.moveaxis(truth, axis_index, 0)
    out = np.zeros_like(moved)
    for i in range(moved.shape[0]):
        if moved[i].any():
            nb = moved[i - 1] if i > 0 else None
            out[i] = degrade_mask(moved[i], rng, nb)
    return np.moveaxis(out, 0, axis_index)


def uncertainty_scores(result, coarse, refined, truth, axis_index):
    """AUROC of the uncertainty (variance) and of the entropy of the mean probability for
    voxels the refined mask gets wrong, over the refined slices' region of interest (the
    coarse mask's 3D bounding box grown by 8 voxels in-plane)."""
    roi = np.zeros_like(coarse, dtype=bool)
    idx = np.nonzero(coarse)
    lo = [max(0, int(i.min()) - (1 if a == axis_index else 8)) for a, i in enumerate(idx)]
    hi = [int(i.max()) + (2 if a == axis_index else 9) for a, i in enumerate(idx)]
    roi[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    wrong = refined != truth
    p = np.clip(result.probability, 1e-6, 1 - 1e-6)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return {"auroc_variance": auroc(result.uncertainty[roi], wrong[roi]),
            "auroc_entropy": auroc(entropy[roi], wrong[roi]),
            "errors_inside_roi": float(wrong[roi].sum() / max(1, wrong.sum()))}


def figure(path: Path, panels: list[dict]) -> None:
    """One row per (case, organ, slice): image, coarse, refined (truth in green), uncertainty."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 4, figsize=(12, 3 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        r0, r1, c0, c1 = p["box"]
        img = p["image"][r0:r1, c0:c1]
        for ax, title, key in zip(row, ["image", "coarse", "refined", "uncertainty"],
                                  [None, "coarse", "refined", "uncertainty"]):
            ax.imshow(img, cmap="gray")
            if key in ("coarse", "refined"):
                ax.contour(p["truth"][r0:r1, c0:c1], levels=[0.5], colors="lime", linewidths=1)
                ax.contour(p[key][r0:r1, c0:c1], levels=[0.5], colors="red", linewidths=1)
                title += f" (slice Dice {p[key + '_dice']:.2f})"
            elif key == "uncertainty":
                ax.imshow(p[key][r0:r1, c0:c1], cmap="magma", alpha=0.7)
                ax.contour(p["wrong"][r0:r1, c0:c1], levels=[0.5], colors="cyan", linewidths=0.7)
                title += " (cyan: refined errors)"
            ax.set_title(f"{p['case']} {p['organ']} z{p['z']}: {title}" if key is None else title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def figure_panels(image_arr, truth, coarse, refined, unc, axis_index, case, organ, n=2):
    """The largest slice and one near the end of the structure, cropped around it."""
    moved = [np.moveaxis(a, axis_index, 0) for a in (image_arr, truth, coarse, refined, unc)]
    areas = moved[1].reshape(moved[1].shape[0], -1).sum(1)
    zs = np.flatnonzero(areas)
    if not len(zs):
        return []
    picks = [int(np.argmax(areas)), int(zs[max(0, len(zs) // 6)])][:n]
    out = []
    for z in picks:
        both = moved[1][z] | moved[2][z] | moved[3][z]
        rows, cols = np.flatnonzero(both.any(1)), np.flatnonzero(both.any(0))
        box = (max(0, rows[0] - 15), rows[-1] + 16, max(0, cols[0] - 15), cols[-1] + 16)
        out.append({"case": case, "organ": organ, "z": z, "box": box, "image": moved[0][z],
                    "truth": moved[1][z], "coarse": moved[2][z], "refined": moved[3][z],
                    "uncertainty": moved[4][z], "wrong": moved[3][z] != moved[1][z],
                    "coarse_dice": dice(moved[2][z], moved[1][z]), "refined_dice": dice(moved[3][z], moved[1][z])})
    return out


def summarise(rows: list[dict]) -> dict:
    organs = [o for o in CHAOS_ORGANS if any(r["organ"] == o for r in rows)]
    mean = lambda key, o: float(np.nanmean([r[key] for r in rows if r["organ"] == o]))  # noqa: E731
    med = lambda key, o: float(np.median([r[key] for r in rows if r["organ"] == o]))  # noqa: E731
    per = {o: {"dice_coarse": mean("dice_coarse", o), "dice_refined": mean("dice_refined", o),
               "hd95_coarse_median": med("hd95_coarse", o), "hd95_refined_median": med("hd95_refined", o),
               "auroc_variance": mean("auroc_variance", o), "auroc_entropy": mean("auroc_entropy", o)}
           for o in organs}
    avg = lambda key: float(np.nanmean([per[o][key] for o in organs]))  # noqa: E731
    return {"per_organ": per, "mean_dice_coarse": avg("dice_coarse"), "mean_dice_refined": avg("dice_refined"),
            "mean_auroc_variance": avg("auroc_variance"), "mean_auroc_entropy": avg("auroc_entropy"),
            "seconds_per_slice": float(np.mean([r["seconds_per_slice"] for r in rows])),
            "network_seconds_per_slice": float(np.mean([r["network_seconds_per_slice"] for r in rows])),
            "structures": len(rows), "cases": len({r["case"] for r in rows})}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refiner", default=None, help=f"refiner name or file (default {DEFAULT_REFINER})")
    parser.add_argument("--model", default=None, help=f"few-shot model (default {DEFAULT_MODEL})")
    parser.add_argument("--mode", default="auto", choices=["auto", "chained", "direct", "registration"],
                        help="propagation; auto = chained with the default model, else registration")
    parser.add_argument("--coarse", default="propagate", choices=["propagate", "perturbed"])
    parser.add_argument("--cases", default=None, help="comma-separated CHAOS ids (default: refiner's held-out)")
    parser.add_argument("--organs", default=",".join(CHAOS_ORGANS))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--start-t", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-size", type=int, default=None, help="refiner crop (default: the refiner's)")
    parser.add_argument("--no-neighbours", action="store_true", help="refine only the slices with the coarse mask")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep-support", action="store_true",
                        help="restore the painted slice after refinement (what the product should do)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data_dir = shared_data_dir(args.data)
    refiner = load_checkpoint(resolve_model_path(args.refiner, default=DEFAULT_REFINER), expect_kind="refiner")
    mode, model = args.mode, None
    if args.coarse == "propagate" and mode != "registration":
        try:
            model = load_checkpoint(resolve_model_path(args.model, default=DEFAULT_MODEL))
            mode = "chained" if mode == "auto" else mode
        except FewShotSegError as exc:
            if mode != "auto":
                raise
            print(f"[info] no few-shot model ({exc}); propagating by registration")
            mode = "registration"
    holdout = [str(c) for c in refiner.provenance.get("holdout_cases", [])]
    cases = args.cases.split(",") if args.cases else (holdout or chaos_cases(data_dir))
    leaked = sorted(set(cases) - set(holdout)) if holdout else []
    options = RefineOptions(samples=args.samples, steps=args.steps, start_t=args.start_t, seed=args.seed,
                            crop_size=args.crop_size, neighbours=not args.no_neighbours)
    popts = PropagationOptions(mode=mode if mode != "auto" else "registration")
    rows, panels, start = [], [], time.perf_counter()
    for case in cases:
        image, label = load_chaos_case(data_dir, case)
        axis_index = array_axis_for(image, "axial")
        image_arr = None
        for organ in args.organs.split(","):
            truth = label == CHAOS_ORGANS[organ]
            if args.coarse == "propagate":
                _, prop, support = score_structure(image, label, CHAOS_ORGANS[organ], model, popts, case, organ)
                coarse = prop.mask.astype(bool)
            else:
                seed = args.seed + 100 * int(case) + CHAOS_ORGANS[organ]
                coarse, support = perturbed_coarse(truth, axis_index, seed), None
            if not coarse.any():
                print(f"case {case} {organ}: empty coarse mask, skipped")
                continue
            keep = support if (args.keep_support and support is not None) else None
            result = refine(image, coarse, refiner, options, keep=keep)
            refined = result.mask.astype(bool)
            spacing = image.GetSpacing()[::-1]
            row = {"case": case, "organ": organ, "dice_coarse": dice(coarse, truth), "dice_refined": dice(refined, truth),
                   "hd95_coarse": hd95(coarse, truth, spacing), "hd95_refined": hd95(refined, truth, spacing),
                   "slices_refined": result.slices_done, "seconds": result.seconds,
                   "seconds_per_slice": result.seconds_per_slice,
                   "network_seconds_per_slice": result.network_seconds / max(1, result.slices_done),
                   **uncertainty_scores(result, coarse, refined, truth, axis_index)}
            rows.append(row)
            print(f"case {case:>3} {organ:13s} Dice {row['dice_coarse']:.3f} -> {row['dice_refined']:.3f}  "
                  f"HD95 {row['hd95_coarse']:.1f} -> {row['hd95_refined']:.1f} mm  AUROC {row['auroc_variance']:.3f}  "
                  f"{row['seconds_per_slice']:.2f} s/slice", flush=True)
            if len(panels) < 6 and case == cases[0]:
                import SimpleITK as sitk
                image_arr = sitk.GetArrayFromImage(image) if image_arr is None else image_arr
                panels += figure_panels(image_arr, truth, coarse, refined, result.uncertainty, axis_index, case, organ)
    if not rows:
        raise SystemExit("nothing was refined")
    tag = args.tag or f"{Path(refiner.path).stem}_{args.coarse if args.coarse == 'perturbed' else mode}"
    summary = summarise(rows)
    payload = {
        "benchmark": "CHAOS-T2, support = largest slice; coarse = propagation (or synthetic damage); then refine",
        "refiner": str(refiner.path.name), "refiner_steps_trained": refiner.provenance.get("steps"),
        "coarse": args.coarse, "propagation": mode if args.coarse == "propagate" else None,
        "few_shot_model": str(model.path.name) if model else None, "keep_support": args.keep_support,
        "cases": cases, "cases_seen_in_refiner_training": leaked,
        "refine_options": options.__dict__, "summary": summary, "per_structure": rows,
        "wall_seconds": time.perf_counter() - start,
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
                    "(shared CPU: timings include contention)", "torch": str(torch.__version__)}
    write_json(RESULTS / f"refine_{tag}.json", payload)
    if panels:
        figure(RESULTS / f"refine_{tag}.png", panels)
    print(f"mean Dice {summary['mean_dice_coarse']:.3f} -> {summary['mean_dice_refined']:.3f}; "
          f"AUROC variance {summary['mean_auroc_variance']:.3f}, entropy {summary['mean_auroc_entropy']:.3f}; "
          f"{summary['seconds_per_slice']:.2f} s per slice -> {RESULTS / f'refine_{tag}.json'}")
    return payload


if __name__ == "__main__":
    main()
