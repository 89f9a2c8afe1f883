"""How should EP1's foreground probabilities become a mask? Rules compared on the same predictions.

The protocol's fold models (benchmarks/fewshot_protocol.py, setting 1) predict each EP1
query once; every rule below binarises that same probability volume, so the differences
are the rules' alone. Several --models average their probabilities (an ensemble).

    python benchmarks/binarisation_study.py --models crtpnet
    python benchmarks/binarisation_study.py --models crtpnet,crtpnet-mask,crtpnet-base,dfdt

Rules that read the query labels are never among them. Fixed thresholds other than the
papers' 0.5 are listed as a sensitivity check: choosing one on these folds would tune on
the test scans, so they are an upper bound, not a result.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from skimage.filters import threshold_otsu

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from FewShotProtocol import protocol as P  # noqa: E402
from FewShotSegLib.checkpoints import load_checkpoint  # noqa: E402
from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.evaluation import write_json  # noqa: E402
from FewShotSegLib.preprocessing import prepare_volume  # noqa: E402

FIXED = (0.4, 0.5, 0.6, 0.7)
WIDE = np.round(np.arange(0.3, 0.8501, 0.05), 2)
RULES = {f"fixed {t}": f"threshold {t} everywhere" + ("" if t == 0.5 else " (sensitivity: chosen on test folds "
                                                                           "it would be an upper bound)")
         for t in FIXED}
RULES.update({
    "otsu": "Otsu threshold of the query volume's probabilities above 0.05",
    "support leave-one-out": "per class, the threshold in 0.3..0.85 that best predicts each EP1 support "
                             "slice from the other two",
    "area per slice": "per query slice, the threshold in 0.4..0.7 whose organ area is nearest its support's",
    "area per third": "per third, the threshold in 0.4..0.7 whose mean organ area per slice is nearest its "
                      "support's (protocol row +at)",
    "area per third, 0.3..0.85": "the same over 0.3..0.85",
    "largest component": "threshold 0.5, then the largest 3D region, holes filled (the '+ 3D post' column)",
})
# The intensity gate (protocol row +ig, FewShotSegLib/postprocessing.py) at its own and nearby
# settings: (robust SDs, confident-core probability). Its row's setting was read off these.
GATES = {f"intensity gate {k:g} SD, " + (f"core {c:g}" if c else "whole mask"): (k, c)
         for k, c in ((3.0, 0.8), (3.0, 0.0), (2.0, 0.8), (4.0, 0.8), (5.0, 0.8), (3.0, 0.7), (3.0, 0.9))}
_GATE_ROWS = {(3.0, 0.8): " (protocol row +ig)", (3.0, 0.0): " (protocol row +igw)"}
RULES.update({rule: f"threshold 0.5, then voxels over {k:g} robust SDs from the median of "
                    + (f"those at probability >= {c:g}" if c else "the whole mask")
                    + " removed, largest 3D region" + _GATE_ROWS.get((k, c), "")
              for rule, (k, c) in GATES.items()})


def support_leave_one_out(predictor, ctx) -> float:
    """The threshold that best predicts each EP1 support slice from the other two."""
    prep = prepare_volume(ctx["s_image"], ctx["s_axis"], predictor.preprocess)
    zs = ctx["ep1_slices"]
    feats = predictor.prepare(prep.model_slices(zs))
    masks = prep.mask_to_model(ctx["s_label"] == ctx["class"], indices=zs)
    scores = np.zeros(len(WIDE))
    for i in range(len(zs)):
        for j in range(len(zs)):
            if i != j:
                prob = predictor.predict(feats[i], masks[i], feats[j:j + 1])[0].numpy()
                scores += [P.count(prob >= t, masks[j].numpy() > 0.5).dice for t in WIDE]
    return float(WIDE[int(np.argmax(scores))])


def _threshold(rule: str, ctx, predictor, part: int, zs: list) -> float:
    """The threshold ``rule`` gives the query slices ``zs`` of EP1 third ``part``."""
    volume, axis = ctx["volume"], ctx["q_axis"]
    if rule.startswith("fixed"):
        return float(rule.split()[1])
    if rule == "otsu":
        values = volume[volume > 0.05]
        return threshold_otsu(values) if values.size > 10 else P.THRESHOLD
    if rule == "support leave-one-out":
        cache = ctx["loo_cache"]          # one per fold: the support scan is the fold's
        if ctx["class"] not in cache:
            cache[ctx["class"]] = support_leave_one_out(predictor, ctx)
        return cache[ctx["class"]]
    if rule.startswith("area"):
        area = P.support_area(ctx["s_image"], ctx["s_label"], ctx["class"], ctx["ep1_slices"][part],
                              ctx["s_axis"])
        chunk = np.moveaxis(np.take(volume, zs, axis=axis), axis, 0)
        return P.area_matched_threshold(chunk, P.pixel_area(ctx["q_image"], axis), area,
                                        WIDE if rule.endswith("0.3..0.85") else P.AREA_THRESHOLDS)
    raise FewShotSegError(f"unknown rule '{rule}'")


def binarise(rule: str, ctx, predictor) -> np.ndarray:
    """The EP1 mask of ``rule`` (only the scored slices can be foreground)."""
    parts = ctx["parts"]
    if rule == "largest component" or rule in GATES:
        mask = P.thresholded(ctx["volume"], ctx["q_axis"], [(zs, P.THRESHOLD) for _, zs in parts])
        if rule == "largest component":
            return P.largest_component(mask, ctx["q_axis"])
        k, c = GATES[rule]
        return P.gated_mask(mask, sitk.GetArrayViewFromImage(ctx["q_image"]), ctx["volume"], ctx["q_axis"],
                            [z for _, zs in parts for z in zs], core_probability=c, robust_sds=k)
    if rule == "area per slice":                  # the area rule, one query slice at a time
        parts = [(part, [z]) for part, zs in parts for z in zs]
    return P.thresholded(ctx["volume"], ctx["q_axis"],
                         [(zs, _threshold(rule, ctx, predictor, part, zs)) for part, zs in parts])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="crtpnet", help="protocol rows whose setting-1 fold models predict "
                                                            "(several: their probabilities averaged)")
    parser.add_argument("--run-name", default="cpu_3k", help="the protocol run whose fold models are used")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--work-dir", default=None, help="fold models (default runs/protocol/<run>)")
    parser.add_argument("--max-queries", type=int, default=None, help="only the first N query scans of a fold")
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/binarisation_<models>.json)")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.max_queries is not None and args.max_queries < 1):
        print("binarisation_study: error: --threads and --max-queries must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        data_dir = P.data_folder(args.data)
        folds = P.select_folds(P.make_folds(P.protocol_cases(data_dir)), args.folds)
        rows = {rule: [] for rule in RULES}
        for fold in folds:
            work = Path(args.work_dir) if args.work_dir else ROOT / "runs" / "protocol" / args.run_name
            paths = [work / m / f"fold_{fold.index}" / "s1" / "model.pt" for m in models]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise FewShotSegError(f"no trained fold model {missing[0]}: run benchmarks/fewshot_protocol.py "
                                      f"--models {args.models} --settings 1 --run-name {args.run_name} first")
            members = [P.ModelPredictor(c.model, c.preprocess, "cpu", 8, m)
                       for c, m in ((load_checkpoint(p), m) for p, m in zip(paths, models))]
            predictor = members[0] if len(members) == 1 else P.EnsemblePredictor(members)
            loo_cache = {}

            def score(ctx):
                ctx["loo_cache"] = loo_cache
                for rule in RULES:
                    pred = binarise(rule, ctx, predictor)
                    counts = P.count(pred, ctx["truth"], [z for _, zs in ctx["parts"] for z in zs], ctx["q_axis"])
                    rows[rule].append({"case": ctx["row"]["case"], "class": ctx["row"]["class"],
                                       "ep1": counts.to_dict()})

            P.evaluate(predictor, data_dir, fold.support, fold.queries[:args.max_queries], list(P.CLASSES),
                       on_ep1=score)
            print(f"fold {fold.index}: " + ", ".join(f"{r} {100 * P.mean_dice(v, 'ep1')['mean']:.2f}"
                                                     for r, v in rows.items()), flush=True)
    except FewShotSegError as exc:
        print(f"binarisation_study: error: {exc}", file=sys.stderr)
        return 2
    from Training.provenance import hardware
    summary = {"models": models, "run": args.run_name, "folds": [f.index for f in folds], "setting": "s1",
               "score": "EP1 mean Dice (%), FewShotProtocol/protocol.py",
               "hardware": hardware(torch.device("cpu"), 1), "wall_seconds": round(time.perf_counter() - start, 1),
               "rules": {rule: {"what": RULES[rule], **{k: (round(100 * v, 2) if k == "mean" else v) for k, v in
                                                        P.mean_dice(rows[rule], "ep1").items() if k != "per_class"},
                                "per_class": {o: round(100 * d, 2)
                                              for o, d in P.mean_dice(rows[rule], "ep1")["per_class"].items()}}
                         for rule in RULES}}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"binarisation_{'+'.join(models)}.json"
    write_json(out, summary)
    for rule, r in summary["rules"].items():
        print(f"{rule:>28}: EP1 {r['mean']:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
