"""Product benchmark: paint the organ's largest slice, click once, score every slice.

CHAOS-T2 (20 volumes x 4 organs, manual labels) and the TotalSegmentator CT case
(agreement with its model-made labels). Writes benchmarks/results/product_<tag>.json.

    python benchmarks/product_benchmark.py --model fewshotseg-default --mode chained
    python benchmarks/product_benchmark.py --mode registration
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from FewShotSegLib.checkpoints import load_checkpoint  # noqa: E402
from FewShotSegLib.evaluation import (CHAOS_ORGANS, TOTALSEG_ORGANS, chaos_cases, label_array,  # noqa: E402
                                      load_chaos_case, score_structure, shared_data_dir,
                                      summarise, write_json)
from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.imageio import read_image  # noqa: E402
from FewShotSegLib.model_store import resolve_model_path  # noqa: E402
from FewShotSegLib.models.multiscale import MULTI_SCALES  # noqa: E402
from FewShotSegLib.propagation import PropagationOptions  # noqa: E402

FLOORS = {"copy support to every slice": 0.381, "copy support to the true extent (oracle)": 0.668}


def run(model_name, mode, cases=None, data=None, tag=None, options_extra=None, skip_ct=False):
    data_dir = shared_data_dir(data)
    checkpoint = None if mode == "registration" else load_checkpoint(resolve_model_path(model_name))
    options = PropagationOptions(mode=mode, **(options_extra or {}))
    case_ids = cases or chaos_cases(data_dir)
    scores, start = [], time.perf_counter()
    for case in case_ids:
        image, label = load_chaos_case(data_dir, case)
        for organ, value in CHAOS_ORGANS.items():
            score, _, _ = score_structure(image, label, value, checkpoint, options, case=case, organ=organ)
            scores.append(score)
            print(f"case {case:>3} {organ:13s} Dice {score.dice:.3f} ({score.seconds:.2f} s)", flush=True)
    chaos = summarise(scores)
    ct_image = read_image(data_dir / "totalseg" / "ct_abdomen_3mm.nii.gz")
    ct_label = label_array(data_dir / "totalseg" / "ct_abdomen_3mm_seg.nii.gz", ct_image)
    ct_scores = []
    for organ, value in ({} if skip_ct else TOTALSEG_ORGANS).items():
        score, _, _ = score_structure(ct_image, ct_label, value, checkpoint, options, case="ct_abdomen_3mm",
                                      organ=organ)
        ct_scores.append(score)
        print(f"TotalSeg CT {organ:13s} Dice {score.dice:.3f}", flush=True)
    name = checkpoint.path.stem if checkpoint else "registration"
    payload = {
        "benchmark": "product: support = largest-area slice, every slice scored, 3D Dice",
        "model": name, "mode": mode, "options": options.__dict__,
        "multi_scales": list(MULTI_SCALES) if options.multi_scale else None,
        "chaos_t2": chaos, "totalseg_ct_agreement": summarise(ct_scores) if ct_scores else None,
        "floors_mean_dice": FLOORS,
        "per_case": [s.to_dict() for s in scores + ct_scores],
        "wall_seconds": time.perf_counter() - start,
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    out = ROOT / "benchmarks" / "results" / f"product_{tag or name + '_' + mode}.json"
    write_json(out, payload)
    print(f"CHAOS-T2 mean Dice {chaos['mean_dice']:.3f} {chaos['dice_per_organ']} -> {out}")
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--mode", default="chained", choices=["chained", "direct", "registration"])
    parser.add_argument("--cases", default=None, help="comma-separated CHAOS ids (default: all 20)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--registration-weight", type=float, default=None,
                        help="chained: fuse the registration-carried mask with this weight")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any PropagationOptions field, e.g. min_intensity_agreement=0 (repeatable)")
    parser.add_argument("--skip-ct", action="store_true", help="CHAOS-T2 only (quick ablations)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {} if args.registration_weight is None else {"registration_weight": args.registration_weight}
    for item in args.option:
        key, _, value = item.partition("=")
        if key not in PropagationOptions.__dataclass_fields__:
            parser.error(f"--option {key}: not a PropagationOptions field")
        try:
            extra[key] = None if value.lower() == "none" else float(value)
        except ValueError:
            parser.error(f"--option {item}: the value must be a number or none")
    try:
        PropagationOptions(mode=args.mode, **extra).validate()
    except FewShotSegError as exc:
        parser.error(str(exc))
    run(args.model, args.mode, args.cases.split(",") if args.cases else None, args.data, args.tag, extra,
        skip_ct=args.skip_ct)


if __name__ == "__main__":
    main()
