"""Choosing a setting on development data, the project's way, in three commands.

A candidate (engine options, or another step network) is run by the simulated user of
`interactive_benchmark.py` on the five development sets -- CHAOS-T2 cases 1-20 painted
axially and coronally, the development CT structures painted axially, coronally and
sagittally -- never on the held-out sets. The rule: adopt iff the mean over the sets of the
mean Dice over 1, 2, 3, 4 and 6 painted slices gains >= 0.005 and no set falls by more than
0.002 (write the question and the rule down, with the date, before the first run).

    python benchmarks/dev_choice.py run base                                   # the current engine
    python benchmarks/dev_choice.py run smooth --option through_plane_smoothing=0.25
    python benchmarks/dev_choice.py score base smooth                         # per set, and the verdict
    python benchmarks/dev_choice.py record base smooth --question Q --rule R --outcome O

Runs go to out/dev/ (not committed); `record` appends the candidates' numbers to
benchmarks/results/dev_choices.json, the file docs/RESULTS.md renders.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "out" / "dev"
CHOICES = ROOT / "benchmarks" / "results" / "dev_choices.json"
COUNTS = {"1": 0, "2": 1, "3": 2, "4": 3, "6": 5}        # painted slices -> round index
MIN_GAIN, MAX_FALL = 0.005, 0.002
# (set name, run file suffix, the run's dataset field, interactive_benchmark arguments)
RUN_ARGS = {"axial": ["--dataset", "dev"], "coronal": ["--dataset", "dev", "--plane", "coronal"],
            "sagittal": ["--dataset", "dev_ct", "--plane", "sagittal"]}
SETS = [("CHAOS axial", "axial", "chaos"), ("CT axial", "axial", "dev_ct"),
        ("CHAOS coronal", "coronal", "chaos"), ("CT coronal", "coronal", "dev_ct"),
        ("CT sagittal", "sagittal", "dev_ct")]


def run(name: str, extra: list[str], jobs: int, folder: Path | None = None) -> None:
    """The three benchmark runs behind the five sets, ``jobs`` at a time (one thread each)."""
    folder = RUNS if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)

    def one(plane: str) -> None:
        out = folder / f"{name}_{plane}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "interactive_benchmark.py"), *RUN_ARGS[plane],
               "--methods", "learned", "--out", str(out), *extra]
        with open(out.with_suffix(".log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"{name}: {plane} done ({out})", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, RUN_ARGS))


def set_means(name: str, folder: Path | None = None) -> dict:
    """Set name -> {"structures", "mean_dice": {count: mean Dice}} of a candidate's runs."""
    folder = RUNS if folder is None else folder
    out = {}
    for label, plane, dataset in SETS:
        path = folder / f"{name}_{plane}.json"
        if not path.is_file():
            raise SystemExit(f"dev_choice: no run {path}: run `python benchmarks/dev_choice.py run {name}` first")
        records = [r for r in json.loads(path.read_text())["structures"]
                   if r["dataset"] == dataset and r["method"] == "learned"]
        if not records:
            raise SystemExit(f"dev_choice: no {label} structures in {path}")
        out[label] = {"structures": len(records),
                      "mean_dice": {k: round(sum(r["dice"][i] for r in records) / len(records), 4)
                                    for k, i in COUNTS.items()}}
    return out


def verdict(base: dict, candidate: dict) -> tuple[bool, float, dict]:
    """(adopt?, the mean gain over the sets, set -> gain): the rule of the module docstring."""
    gains = {}
    for label in base:
        b, c = base[label]["mean_dice"], candidate[label]["mean_dice"]
        gains[label] = sum(c[k] - b[k] for k in COUNTS) / len(COUNTS)
    mean = sum(gains.values()) / len(gains)
    return mean >= MIN_GAIN and min(gains.values()) >= -MAX_FALL, mean, gains


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the five development sets for a candidate")
    p_run.add_argument("name")
    p_run.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p_run.add_argument("--stepper", default=None, help="another step network")
    p_run.add_argument("--jobs", type=int, default=2)
    for command in ("score", "record"):
        p = sub.add_parser(command)
        p.add_argument("base")
        p.add_argument("candidates", nargs="+")
    p_record = sub.choices["record"]
    for field in ("question", "rule", "outcome", "dev-cases"):
        p_record.add_argument(f"--{field}", required=field != "dev-cases")
    args = parser.parse_args(argv)
    if args.command == "run":
        extra = [a for o in args.option for a in ("--option", o)] + (["--stepper", args.stepper] if args.stepper else [])
        run(args.name, extra, args.jobs)
        return 0
    base = set_means(args.base)
    results = {name: set_means(name) for name in args.candidates}
    for name, means in results.items():
        adopt, mean, gains = verdict(base, means)
        print(f"{name} against {args.base}: mean gain {mean:+.4f} ("
              + ", ".join(f"{label} {g:+.4f}" for label, g in gains.items()) + f"): {'ADOPT' if adopt else 'not adopted'}")
    if args.command == "record":
        choices = json.loads(CHOICES.read_text())
        choices["choices"].append({
            "question": args.question, "rule": args.rule,
            "dev_cases": args.dev_cases or "CHAOS 1,2,3,5,8,10,13,15,19,20 axial + coronal, dev_ct axial, coronal, "
                                           "sagittal; method learned, worst-slice user, 6 rounds",
            "candidates": {args.base: base, **results}, "outcome": args.outcome})
        CHOICES.write_text(json.dumps(choices, indent=1) + "\n")
        print(f"recorded in {CHOICES}; render docs/RESULTS.md with python benchmarks/report.py --write")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
