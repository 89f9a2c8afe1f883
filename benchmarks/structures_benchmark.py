"""Several structures of one scan, each painted, propagated alone or all at once.

The simulated user of `interactive_benchmark.py`, on every scored structure of a scan at
the same time: round 0 paints each structure on its largest axial slice; each further round
paints, for each structure, the slice where its current result has the most wrong voxels
(its true mask there, or marks the slice absent for that structure). Two users, each
following its own results:

* ``alone``: each structure propagated by itself (`propagate`), as one segment at a time;
* ``together``: all of them in one run (`structures.propagate_structures`): the voxels two
  results claim go to the structure painted nearest.

Mean Dice over the structures after 1, 2, 3, 4 and 6 painted slices per structure, and
seconds per click (all the scan's structures). ``dev`` / ``dev_ct`` are the development
sets (never reported as results; see interactive_benchmark.py).

    python benchmarks/structures_benchmark.py --dataset chaos        # -> benchmarks/results/structures_chaos.json
    python benchmarks/structures_benchmark.py --dataset dev --out out/dev/structures_dev.json
    python benchmarks/structures_benchmark.py --dataset chaos --mode registration --out benchmarks/results/structures_registration_chaos.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import interactive_benchmark as ib  # noqa: E402  (the user's rules and the data)

METHODS = ("alone", "together")


def scans(dataset: str, data_dir: Path):
    """(case, image, {organ: (value, truth)}) per scan of the dataset."""
    if dataset in ("chaos", "dev"):
        gen = ib.chaos_structures(data_dir, cases=ib.CHAOS_HELD_OUT if dataset == "chaos" else ib.DEV_CHAOS)
    else:
        gen = ib.totalseg_structures(data_dir, dataset=dataset)
    grouped: dict = {}
    for _, case, organ, image, truth, _ in gen:
        entry = grouped.setdefault(case, (image, {}))
        entry[1][organ] = (len(entry[1]) + 1, truth)
    for case, (image, organs) in grouped.items():
        yield case, image, organs


class User:
    """One simulated user of one method on one scan: what it has painted and marked absent
    per structure, and its next pick from the current results."""

    def __init__(self, organs: dict, axis: int):
        self.organs, self.axis = organs, axis
        self.painted = {o: [int(np.argmax(ib.slice_counts(t, axis)))] for o, (_, t) in organs.items()}
        self.absent = {o: [] for o in organs}
        self.picks = {o: [p[0]] for o, p in self.painted.items()}

    def inputs(self, organ):
        return ib.inputs_for(self.organs[organ][1], self.axis, self.painted[organ], self.absent[organ])

    def correct(self, predictions: dict) -> None:
        for organ, (_, truth) in self.organs.items():
            done = set(self.painted[organ]) | set(self.absent[organ])
            nxt = ib.worst_slice(predictions[organ], truth, self.axis, done)
            if nxt is None:
                continue
            (self.painted if ib.slice_counts(truth, self.axis)[nxt] > 0 else self.absent)[organ].append(nxt)
            self.picks[organ].append(nxt if nxt in self.painted[organ] else -1 - nxt)


def run_alone(image, model, options, user: User, session) -> dict:
    from FewShotSegLib.propagation import propagate
    out = {}
    for organ in user.organs:
        support, exclude = user.inputs(organ)
        out[organ] = propagate(image, support, model, options, exclude=exclude, session=session).mask.astype(bool)
    return out


def run_together(image, model, options, user: User, session) -> dict:
    from FewShotSegLib.structures import propagate_structures
    labels = np.zeros(next(iter(user.organs.values()))[1].shape, np.uint8)
    excludes = {}
    for organ, (value, _) in user.organs.items():
        support, exclude = user.inputs(organ)
        labels[support] = value
        if exclude is not None:
            excludes[value] = exclude
    result = propagate_structures(image, labels, model, options, exclude=excludes, session=session)
    return {organ: result.labels == value for organ, (value, _) in user.organs.items()}


def run_scan(dataset, case, image, organs, model, rounds: int, mode: str = "auto", plane: str = "axial") -> list:
    from FewShotSegLib.evaluation import painting_axis
    from FewShotSegLib.metrics import dice
    from FewShotSegLib.propagation import PropagationOptions, PropagationSession
    from FewShotSegLib.imageio import array_axis_for
    options = PropagationOptions(mode=mode)
    axis = painting_axis(image, options) if plane == "axial" else int(array_axis_for(image, plane))
    records = []
    for method, runner in (("alone", run_alone), ("together", run_together)):
        user, session = User(organs, axis), PropagationSession()
        dices = {o: [] for o in organs}
        seconds = []
        for r in range(rounds):
            start = time.perf_counter()
            predictions = runner(image, model, options, user, session)
            seconds.append(round(time.perf_counter() - start, 3))
            for organ, (_, truth) in organs.items():
                dices[organ].append(round(float(dice(predictions[organ], truth)), 4))
            if r < rounds - 1:
                user.correct(predictions)
        for organ in organs:
            records.append({"dataset": dataset, "case": case, "organ": organ, "method": method,
                            "dice": dices[organ], "picks": user.picks[organ], "seconds_per_click": seconds})
        print(f"{dataset} {case} {method}: " + ", ".join(f"{o} {d[0]:.3f}->{d[-1]:.3f}" for o, d in dices.items())
              + f"  ({seconds[0]:.1f} s first click)", flush=True)
    return records


def summarise(records: list) -> dict:
    out = {}
    for method in METHODS:
        rs = [r for r in records if r["method"] == method]
        if not rs:
            continue
        rounds = min(len(r["dice"]) for r in rs)
        clicks = {(r["case"], i): s for r in rs for i, s in enumerate(r["seconds_per_click"])}
        out[method] = {"structures": len(rs),
                       "mean_dice": {str(c): round(float(np.mean([r["dice"][c - 1] for r in rs])), 4)
                                     for c in ib.REPORT_COUNTS if c <= rounds},
                       "seconds_first_click": round(float(np.mean([s for (_, i), s in clicks.items() if i == 0])), 3),
                       "seconds_later_clicks": round(float(np.mean([s for (_, i), s in clicks.items() if i > 0]
                                                                   or [0.0])), 3)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="chaos", choices=["chaos", "totalseg", "totalseg_mr", "dev", "dev_ct"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plane", default="axial", choices=["axial", "coronal", "sagittal"],
                        help="the plane every structure is painted in")
    parser.add_argument("--mode", default="auto", choices=["auto", "registration"],
                        help="registration: no network (the baseline the step network must beat)")
    args = parser.parse_args(argv)
    import torch
    from FewShotSegLib.checkpoints import load_for_mode
    from FewShotSegLib.evaluation import shared_data_dir
    torch.set_num_threads(args.threads)
    data_dir = shared_data_dir(args.data)
    plane = "" if args.plane == "axial" else f"{args.plane}_"
    out = Path(args.out) if args.out else ib.RESULTS / f"structures_{plane}{args.dataset}.json"
    model = load_for_mode(None, "auto")
    records = []
    for case, image, organs in scans(args.dataset, data_dir):
        records += run_scan(args.dataset, case, image, organs, model, args.rounds, args.mode, args.plane)
    payload = {"benchmark": __doc__.splitlines()[0], "dataset": args.dataset,
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "commit": ib.git_commit(), "hardware": ib.hardware(args.threads),
               "settings": {"rounds": args.rounds, "plane": args.plane,
                            "model": "the shipped default" if args.mode == "auto" else "none (registration alone)"},
               "summary": summarise(records)}
    text = json.dumps(payload, indent=2)
    rows = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text[:-2] + ',\n  "structures": [\n' + rows + "\n  ]\n}\n")
    os.replace(tmp, out)
    print(json.dumps(payload["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
