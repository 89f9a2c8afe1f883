"""The papers' few-shot protocol on CHAOS-T2 in one command (5 folds, EP1/EP2, settings 1/2).

    python benchmarks/fewshot_protocol.py --budget smoke --threads 1           # 2-core CPU, minutes
    python benchmarks/fewshot_protocol.py --budget full --device cuda          # all folds, 20000 steps per model
    python benchmarks/fewshot_protocol.py --models registration --folds 0,1    # the non-learned row only
    python benchmarks/fewshot_protocol.py --checkpoint Resources/Models/fewshotseg-default.pt --settings 1

What is scored and why: FewShotProtocol/protocol.py. Each (model, setting, fold) is written
to benchmarks/results/protocol/<run>/<model>/fold_<k>_s<1|2>.json as soon as it is done;
the same command again skips finished folds and resumes interrupted trainings (kept under
runs/protocol/<run>/). Then: benchmarks/results/protocol_<run>.json (summary), .md (the
table beside the papers), .png (bar chart) and protocol_<run>_examples.png (the registered models' first fold).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from FewShotProtocol import protocol as P  # noqa: E402
from FewShotProtocol import report as R  # noqa: E402
from FewShotSegLib.checkpoints import load_checkpoint  # noqa: E402
from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.evaluation import write_json  # noqa: E402
from FewShotSegLib.model_store import sha256_of  # noqa: E402
from FewShotSegLib.models import available_models  # noqa: E402
from FewShotSegLib.models.support_zoom import SupportZoomModel  # noqa: E402
from FewShotSegLib.overview import save_overview  # noqa: E402
from FewShotSegLib.preprocessing import PreprocessConfig  # noqa: E402
from Training.slice_packs import SUFFIX as PACK_SUFFIX  # noqa: E402
from FewShotSegLib.augmentation import AugmentConfig  # noqa: E402
from FewShotSegLib.support_tuning import tuned_on_support  # noqa: E402

PROG = "fewshot_protocol"
DEFAULT_CONFIG = ROOT / "Training" / "configs" / "ssl_default.json"


def log(message: str) -> None:
    print(message, flush=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FewShotSegError(f"device '{name}' requested but no CUDA GPU is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise FewShotSegError(f"--device must be cpu, cuda or auto, not '{name}'")
    return name


def trained_on_queries(provenance: dict, data_dir: Path, queries: list[str]) -> list[str]:
    """Query scans whose image a checkpoint was trained on: by content (sha256) when the
    provenance has hashes, else by file name."""
    hashes = set((provenance.get("data_sha256") or {}).values()) | set(
        (provenance.get("pack_sources_sha256") or {}).values())  # a slice pack stands for its scan
    names = {Path(p).name for p in provenance.get("data") or []}
    hit = []
    for case in queries:
        image = data_dir / "chaos_t2" / f"image_{case}.nii.gz"
        if (hashes and sha256_of(image) in hashes) or (not hashes and image.name in names):
            hit.append(case)
    return hit


# ----------------------------------------------------------------------------- training
def setting_dir(group) -> str:
    """A fold model's folder name: s1, or s2_<classes> for a setting-2 group."""
    return "s1" if group is None else "s2_" + "-".join(map(str, group))


def fold_model_dir(args, model: str, fold: P.Fold, group) -> Path:
    """Where one fold's model trains: .../<model>/fold_<k>/s1 or s2_<classes>."""
    return args.work_dir / _safe(model) / f"fold_{fold.index}" / setting_dir(group)


def can_rescore(args, model: str, fold: P.Fold, setting: str, checkpoint) -> bool:
    """``--rescore`` needs no training: the registration row, a given checkpoint, or a
    fold whose trained models are all still on disk."""
    if model == "registration" or checkpoint is not None:
        return True
    groups = [None] if setting == "s1" else args.groups
    return all((fold_model_dir(args, model, fold, g) / "model.pt").is_file() for g in groups)


def fold_training_config(args, base: dict, model: str, fold: P.Fold, group, data_dir: Path,
                         packs: Path | None = None) -> dict:
    """The training config of one fold's model: the images outside the fold, or, with
    ``packs`` (a folder of `Training.slice_packs` files, for a leased GPU), their packs.

    ``group``: None for setting 1; the test classes for setting 2, whose slices the
    training config's ``exclude_labels`` removes (strict rule)."""
    out = fold_model_dir(args, model, fold, group)
    chaos = data_dir / "chaos_t2"
    data = {**base.get("data", {}), **P.training_data_of(model), "labels": [], "exclude": [],
            "preprocess": {**base.get("data", {}).get("preprocess", {}), "size": args.size},
            "cache_dir": str(args.cache_dir)}
    if packs is None:
        data.update(images=[str(chaos / f"image_{c}.nii.gz") for c in fold.train], exclude_labels=None if (
            group is None) else {"labels": [str(chaos / f"label_{c}.nii.gz") for c in fold.train],
                                 "values": list(group)})
    else:
        data.update(images=[], packs=[str(packs / f"image_{c}{PACK_SUFFIX}") for c in fold.train],
                    exclude_labels=None if group is None else {"values": list(group)})
    arch, options = P.model_of(model)
    config = {**base, **P.training_of(model), "name": "model", "model": arch, "steps": P.steps_of(model, args.steps),
              "device": args.device, "model_config": {**base.get("model_config", {}), **options}, "out": str(out),
              "data": data, "card": {"description": f"few-shot protocol, fold {fold.index}, {out.name}: "
                                                    f"self-supervised on the {len(fold.train)} scans outside the fold"}}
    if args.threads:
        config["num_threads"] = args.threads
    if args.device.startswith("cuda"):
        config.setdefault("num_workers", 4)  # episodes are built on the CPU, ahead of the GPU
    return config


def train_fold_model(args, base: dict, model: str, fold: P.Fold, group, data_dir: Path) -> Path:
    """Train (or resume, or reuse) one fold's model on the images outside the fold."""
    from Training.train import load_config, train
    config = fold_training_config(args, base, model, fold, group, data_dir)
    out, setting, steps = Path(config["out"]), Path(config["out"]).name, config["steps"]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    release = out / "model.pt"
    if release.is_file():
        prov = load_checkpoint(release).provenance
        if prov.get("final") and prov.get("steps") == steps:
            log(f"  fold {fold.index} {setting}: trained model found ({release})")
            return release
    resume = (out / "train_state.pt").is_file()
    log(f"  fold {fold.index} {setting}: {'resuming' if resume else 'training'} {model}, {steps} steps, "
        f"{len(fold.train)} scans" + ("" if group is None else f", slices with {R.class_names(group)} removed"))
    return train(load_config(out / "config.json", {}), resume=resume)


# ----------------------------------------------------------------------------- one fold
def run_fold(args, base, model: str, fold: P.Fold, queries, setting: str, data_dir: Path, checkpoint=None,
             variant: str = ""):
    """Evaluate one (model, setting, fold); returns the JSON payload (rows + how made).
    ``variant``: a `P.test_time_option` key (``at``, ``blend+at``): the same trained weights, scored with it."""
    from Training.provenance import hardware
    start, load_at_start = time.perf_counter(), _cpu_load()
    notes, checkpoints, train_seconds, compliant = [], [], 0.0, True
    evaluations = []
    option = P.test_time_option(variant) if variant else P.TestTime({}, "")
    if model == "registration":
        ev = P.evaluate(P.RegistrationPredictor(PreprocessConfig(size=args.size)), data_dir, fold.support,
                        queries, list(P.CLASSES), progress=log)
        evaluations.append(ev)
        notes.append("no training: setting 2 equals setting 1")
        steps, size = 0, args.size
    else:
        if checkpoint is not None:
            jobs = [(checkpoint, list(P.CLASSES))]
        elif setting == "s1":
            jobs = [(train_fold_model(args, base, model, fold, None, data_dir), list(P.CLASSES))]
        else:
            jobs = [(train_fold_model(args, base, model, fold, g, data_dir), list(g)) for g in args.groups]
        if model in P.VARIANTS:
            notes.append(f"{P.VARIANTS[model].model} variant: {P.VARIANTS[model].what}")
        if variant:
            notes.append(option.what)
        for path, classes in jobs:
            ckpt = load_checkpoint(path, device=args.device)
            if variant:
                ckpt.model.config.update(option.model_options)
            leaked = trained_on_queries(ckpt.provenance, data_dir, queries)
            if leaked:
                compliant = False
                notes.append(f"not protocol-compliant: trained on all scans (query scans {','.join(leaked)} "
                             "were in its training data)")
            train_seconds += float(ckpt.provenance.get("wall_seconds") or 0)
            checkpoints.append({"path": str(path), "steps": ckpt.provenance.get("steps"), "classes": classes,
                                "hardware": ckpt.provenance.get("hardware"),
                                "code_version": ckpt.provenance.get("code_version")})
            members = [(ckpt, model)]
            if option.ensemble:
                for partner, compliant in ensemble_partners(args, path, fold, queries, data_dir, notes, compliant):
                    partner.model.config.update(option.model_options)
                    train_seconds += float(partner.provenance.get("wall_seconds") or 0)
                    checkpoints.append({"path": str(partner.path), "steps": partner.provenance.get("steps"),
                                        "classes": classes, "hardware": partner.provenance.get("hardware"),
                                        "code_version": partner.provenance.get("code_version"), "ensemble": True})
                    members.append((partner, "ensemble partner"))
            evaluations.append(score_fold_model(args, option, model, members, data_dir, fold, queries, classes))
        steps, size = checkpoints[0]["steps"], ckpt.preprocess.size
    rows = sorted((r for ev in evaluations for r in ev.rows), key=lambda r: (queries.index(r["case"]), r["class"]))
    examples = sorted((e for ev in evaluations for e in ev.examples),
                      key=lambda e: list(P.CLASSES.values()).index(e[0]))
    eval_seconds = sum(ev.seconds for ev in evaluations)
    payload = {
        "protocol": "CHAOS-T2 1-way 1-shot, FewShotProtocol/protocol.py", "model": _row_name(model, variant),
        "setting": setting,
        "fold": fold.index, "queries": queries, "support": fold.support, "train_scans": fold.train,
        "budget": args.budget if checkpoint is None else "checkpoint", "steps": steps, "size": size,
        "s2_groups": [list(g) for g in args.groups] if setting == "s2" else None,
        "training_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "hardware": hardware(torch.device(args.device), 1), "device": args.device, "torch": torch.__version__,
        # other jobs on the same cores inflate the wall times: the 1-min load average says how busy it was
        "cpu_load": max((v for v in (load_at_start, _cpu_load()) if v is not None), default=None),
        "checkpoints": checkpoints, "compliant": compliant, "notes": notes, "rows": rows,
        "mean_dice": {k: P.mean_dice(rows, k)["mean"] for k in P.SCORES},
    }
    return payload, examples


def row_predictor(args, option: P.TestTime, model: str, members: list):
    """The row's predictor over ``members`` ``[(network, preprocess, name)]``, wrapped by its
    test-time options."""
    predictors = [P.ModelPredictor(SupportZoomModel(net) if option.support_zoom else net, prep, args.device,
                                   args.batch_size, name) for net, prep, name in members]
    predictor = predictors[0] if len(predictors) == 1 else P.EnsemblePredictor(predictors, model)
    if option.mirrored:
        predictor = P.MirrorAveragePredictor(predictor)
    if option.multiscale:   # outermost: its features are per scale, not one tensor
        predictor = P.MultiScalePredictor(predictor)
    if option.location_prior:   # outermost of all: it multiplies the finished probabilities
        predictor = P.LocationPriorPredictor(predictor)
    return predictor


def score_fold_model(args, option: P.TestTime, model: str, members: list, data_dir: Path, fold: P.Fold,
                     queries, classes) -> P.FoldEvaluation:
    """EP1 and EP2 of one fold model (with its ensemble partners, ``[(checkpoint, name)]``).
    With +tune each episode gets copies tuned on its own labelled slices only (EP1: three per
    organ, EP2: one), so each reads no label its protocol does not give; the tuning time is
    test time and counts with the evaluation."""
    def score(nets, episodes):
        return P.evaluate(row_predictor(args, option, model, [(net, c.preprocess, name) for net, (c, name)
                                                               in zip(nets, members)]),
                          data_dir, fold.support, queries, classes, progress=log, episodes=episodes,
                          area_threshold=option.area_threshold, blend_supports=option.blended,
                          smooth_slices=option.smoothed, self_support=option.self_support,
                          intensity_gate=option.intensity_gate, gate_whole_mask=option.gate_whole_mask)

    if not option.support_tuning:
        return score([c.model for c, _ in members], ("ep1", "ep2"))
    parts = []
    for episode in ("ep1", "ep2"):
        start = time.perf_counter()
        examples = P.support_examples(data_dir, fold.support, classes, members[0][0].preprocess, episode)
        augment_cfg = AugmentConfig(intensity_remap=P.TUNING_REMAP) if option.tuning_remap else None
        nets = [tuned_on_support(c.model, examples, seed=fold.index, augment_cfg=augment_cfg, **P.SUPPORT_TUNING)
                for c, _ in members]
        tuned_seconds = time.perf_counter() - start
        log(f"  {episode}: {len(nets)} model(s) tuned on the support's labelled slices ({tuned_seconds:.0f} s)")
        parts.append(score(nets, (episode,)))
        parts[-1].seconds += tuned_seconds
    return P.merged_episodes(*parts)


def ensemble_partners(args, path: Path, fold: P.Fold, queries, data_dir: Path, notes: list, compliant: bool):
    """The ``+ens`` partners of the fold model at ``path``, with the row's compliance so far:
    the same fold and setting under each ``--ensemble-with`` folder; a partner trained on a
    query scan makes the row non-compliant."""
    for folder in args.ensemble_with:
        partner_path = folder / f"fold_{fold.index}" / path.parent.name / "model.pt"
        if not partner_path.is_file():
            raise FewShotSegError(f"+ens: no fold model {partner_path} (--ensemble-with must hold "
                                  "fold_<k>/<s1|s2_a-b>/model.pt of a finished protocol run)")
        partner = load_checkpoint(partner_path, device=args.device)
        leaked = trained_on_queries(partner.provenance, data_dir, queries)
        if leaked:
            notes.append(f"not protocol-compliant: the ensemble partner was trained on query scans "
                         f"{','.join(leaked)}")
        notes.append(f"ensemble partner: {Path(folder).parent.name}/{Path(folder).name} "
                     f"({partner.provenance.get('steps')} steps)")
        compliant = compliant and not leaked
        yield partner, compliant


def _cpu_load() -> float | None:
    """The 1-minute load average (runnable processes; > the core count: jobs waited), or None
    where the system does not say."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _row_name(model: str, variant: str) -> str:
    return f"{model}+{variant}" if variant else model


def fold_key(args, model, fold, queries, setting, checkpoint) -> dict:
    """What a finished fold file must match to be reused (else: another --run-name)."""
    steps = None if model == "registration" or checkpoint else P.steps_of(model.partition("+")[0], args.steps)
    key = {"model": model, "setting": setting, "fold": fold.index, "queries": queries, "support": fold.support,
           "steps": steps, "size": args.size,
           "checkpoint": str(checkpoint) if checkpoint else None,
           "s2_groups": [list(g) for g in args.groups] if setting == "s2" else None}
    if "ens" in model.split("+")[1:]:   # only these rows: older fold files keep their keys
        key["ensemble_with"] = ",".join(map(str, args.ensemble_with))   # one folder: as before
    if "tune" in model.split("+")[1:]:
        key["support_tuning"] = dict(P.SUPPORT_TUNING)
    if "ir" in model.split("+")[1:]:
        key["tuning_remap"] = P.TUNING_REMAP
    return key


def process(args, base, model, fold, queries, settings, data_dir, checkpoint=None, variant="") -> None:
    row = _row_name(model, variant)
    folder = args.results_dir / "protocol" / args.run_name / _safe(row)
    todo = []
    for setting in settings:
        path = folder / f"fold_{fold.index}_{setting}.json"
        key = fold_key(args, row, fold, queries, setting, checkpoint)
        if path.is_file():
            done = json.loads(path.read_text())
            old = done.get("key") or {}
            if old != key:
                diff = ", ".join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in key.items() if old.get(k) != v)
                raise FewShotSegError(f"{path} was made with {diff}; use another --run-name or delete that file")
            if args.rescore and can_rescore(args, model, fold, setting, checkpoint):
                log(f"{row} fold {fold.index} {setting}: scoring again with the trained model ({path})")
                todo.append((setting, path, key))
            else:
                log(f"{row} fold {fold.index} {setting}: done before, skipped ({path})"
                    + ("; its trained model is gone, so it keeps its old scores" if args.rescore else ""))
            continue
        todo.append((setting, path, key))
    if model == "registration" and todo:  # no training: one evaluation serves both settings
        log(f"{model} fold {fold.index}: queries {','.join(queries)}, support {fold.support}")
        payload, examples = run_fold(args, base, model, fold, queries, "s1", data_dir)
        for setting, path, key in todo:
            _write(args, path, {**payload, "setting": setting, "key": key}, examples)
        return
    for setting, path, key in todo:
        log(f"{row} fold {fold.index} {setting}: queries {','.join(queries)}, support {fold.support}")
        payload, examples = run_fold(args, base, model, fold, queries, setting, data_dir, checkpoint, variant)
        _write(args, path, {**payload, "key": key}, examples)


def fold_figure_path(args, path: Path) -> Path:
    """Where a fold's example figure goes: beside its JSON for a registered model or the
    baseline; under the work dir (not committed) for variant and test-time rows, whose
    ~0.2 MB figures had grown benchmarks/results past 35 MB."""
    row = path.parent.name
    if P.family_of(row) == row:
        return path.with_suffix(".png")
    return args.work_dir / "figures" / row / path.with_suffix(".png").name


def _write(args, path: Path, payload: dict, examples) -> None:
    if examples:
        save_overview(fold_figure_path(args, path), examples, tile=160)
    write_json(path, payload)
    m = payload["mean_dice"]
    log(f"  -> {path}: mean Dice " + "  ".join(
        f"{name} {'-' if m[key] is None else format(m[key], '.3f')}"
        for key, name in (("ep1", "EP1"), ("ep1_post", "EP1+post"), ("ep2", "EP2"), ("ep2_post", "EP2+post"))))


# ----------------------------------------------------------------------------- summary
def publish(args) -> dict:
    """Summary JSON + Markdown + bar chart + examples from every fold file of the run."""
    run_dir = args.results_dir / "protocol" / args.run_name
    results = [json.loads(p.read_text()) for p in sorted(run_dir.glob("*/fold_*_s*.json"))]
    summary = R.summarise(results)
    summary.update({"run": args.run_name, "fold_files": str(run_dir), "command": " ".join(sys.argv)})
    stem = args.results_dir / f"protocol_{args.run_name}"
    write_json(stem.with_suffix(".json"), summary)
    stem.with_suffix(".md").write_text(R.markdown(summary, args.run_name, P.__doc__))
    chart = R.bar_chart(summary, stem.with_suffix(".png"))
    # The Fig. 3-style figure shows the models as registered (and the baseline), one fold
    # each: a tile strip per variant and test-time row would grow it by ~0.2 MB a row (every
    # row keeps its own per-fold figure beside its JSON).
    firsts = {}
    for p in sorted(run_dir.glob("*/fold_*_s*.png")):
        if P.family_of(p.parent.name) == p.parent.name:
            firsts.setdefault(p.parent.name, (f"{p.parent.name} {p.stem}", p))
    figure = args.results_dir / f"protocol_{args.run_name}_examples.png"
    examples = R.stack_images(list(firsts.values()), figure)
    if examples is None:
        figure.unlink(missing_ok=True)  # an earlier figure would show rows this run no longer has
    for e in summary["results"]:
        log(f"{e['model']:>14} {e['setting']}: EP1 {R._pct(e['ep1']['mean'])}  EP2 {R._pct(e['ep2']['mean'])}  "
            f"folds {e['folds']}" + ("" if e["compliant"] else "  (not protocol-compliant)"))
    log(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}"
        + (f", {chart}" if chart else "") + (f", {examples}" if examples else ""))
    return summary


# ----------------------------------------------------------------------------- command line
def parse(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="alpnet,registration",
                        help=f"comma-separated: {', '.join(available_models())}, registration, or a "
                             f"variant ({', '.join(P.VARIANTS)}: see FewShotProtocol/protocol.py)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                        help="also evaluate this trained checkpoint as it is (no training; setting 1)")
    parser.add_argument("--settings", default="1,2", help="1, 2 or 1,2")
    parser.add_argument("--budget", choices=sorted(P.BUDGETS), default="smoke")
    parser.add_argument("--folds", default=None, help="e.g. 0,1 (default: the budget's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the budget's)")
    parser.add_argument("--size", type=int, default=None, help="model grid in pixels (default: the budget's)")
    parser.add_argument("--cases", default=None, help="only these query case ids (comma-separated)")
    parser.add_argument("--max-queries", type=int, default=None, help="only the first N query scans of a fold")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass at evaluation")
    parser.add_argument("--data", default=None, help="folder holding chaos_t2/ (default ../shared/data)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base training config (JSON)")
    parser.add_argument("--run-name", default=None, help="results name (default: the budget)")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default=None, help="fold checkpoints (default runs/protocol/<run>)")
    parser.add_argument("--cache-dir", default=str(ROOT / "cache" / "superpixels"))
    parser.add_argument("--query-prototypes", action="store_true",
                        help="also score each model with test-time query prototypes (row <model>+qp; "
                             "same trained weights; alpnet and crtpnet)")
    parser.add_argument("--support-refinement", action="store_true",
                        help="also score each model with its prototypes fitted to the support slice at test "
                             "time (row <model>+sr; same trained weights)")
    parser.add_argument("--area-threshold", action="store_true",
                        help="also score each model with EP1's query-adaptive threshold matched to the support "
                             "slice's organ area (row <model>+at; same trained weights)")
    parser.add_argument("--mirror-average", action="store_true",
                        help="also score each model with its probabilities averaged over the episode and its "
                             "left-right mirror (row <model>+mirror; same trained weights; twice the time)")
    parser.add_argument("--blend-supports", action="store_true",
                        help="also score each model with EP1's query slices mixing the two nearest thirds' "
                             "support predictions by position (row <model>+blend; same trained weights)")
    parser.add_argument("--test-time", default="",
                        help="further test-time rows, comma-separated, each one option or several joined by "
                             "'+' (e.g. blend+at,blend+mirror: row <model>+blend+at; same trained weights)")
    parser.add_argument("--ensemble-with", default=None, metavar="DIR[,DIR...]",
                        help="for +ens rows: the fold models of other protocol runs to average with, "
                             "DIR/fold_<k>/<s1|s2_a-b>/model.pt (e.g. runs/protocol/cpu_3k/crtpnet)")
    parser.add_argument("--rescore", action="store_true",
                        help="score finished folds again with their trained models (no training; "
                             "folds whose models are gone keep their results)")
    parser.add_argument("--s2-groups", default="1+4,2+3",
                        help="setting-2 test-class groups, one model each (default SSL-ALPNet's)")
    return parser.parse_args(argv)


def prepare(args):
    """Check every input before any work: a bad option costs nothing and keeps results."""
    budget = P.BUDGETS[args.budget]
    args.steps = args.steps or budget["steps"]
    args.size = args.size or budget["size"]
    if args.steps < 1 or not 16 <= args.size <= 2048 or args.batch_size < 1:
        raise FewShotSegError("--steps and --batch-size must be positive, --size within 16..2048")
    if args.max_queries is not None and args.max_queries < 1:
        raise FewShotSegError("--max-queries must be at least 1")
    args.device = _device(args.device)
    args.run_name = _safe(args.run_name or args.budget)
    args.results_dir = Path(args.results_dir).resolve()
    args.work_dir = Path(args.work_dir).resolve() if args.work_dir else ROOT / "runs" / "protocol" / args.run_name
    args.cache_dir = Path(args.cache_dir).resolve()
    try:
        settings = [f"s{int(s)}" for s in args.settings.split(",") if s.strip()]
        args.groups = [tuple(int(v) for v in g.split("+")) for g in args.s2_groups.split(",") if g.strip()]
    except ValueError:
        raise FewShotSegError("--settings takes 1,2 and --s2-groups e.g. 1+4,2+3") from None
    if not settings or set(settings) - {"s1", "s2"}:
        raise FewShotSegError(f"--settings must be 1, 2 or 1,2, not '{args.settings}'")
    if any(v not in P.CLASSES for g in args.groups for v in g) or not args.groups:
        raise FewShotSegError(f"--s2-groups must use the classes {sorted(P.CLASSES)}, not '{args.s2_groups}'")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = available_models() + list(P.VARIANTS) + ["registration"]
    for m in models:
        if m not in known:
            raise FewShotSegError(f"unknown model '{m}'; available: {', '.join(known)}")
    args.test_time = [k.strip() for k in args.test_time.split(",") if k.strip()]
    for key in args.test_time:
        P.test_time_option(key)  # fails early, naming the key
    folders = [f.strip() for f in (args.ensemble_with or "").split(",") if f.strip()]
    if any("ens" in key.split("+") for key in args.test_time):
        if not folders or not all(Path(f).is_dir() for f in folders):
            raise FewShotSegError("test-time option ens needs --ensemble-with DIR[,DIR...], existing folders of "
                                  f"fold models (got {args.ensemble_with!r})")
        if args.checkpoint:
            raise FewShotSegError("test-time option ens pairs fold models; it does not apply to --checkpoint")
    args.ensemble_with = [Path(f).resolve() for f in folders]
    wants_qp = args.query_prototypes or any("qp" in key.split("+") for key in args.test_time)
    if wants_qp:
        from FewShotSegLib.models.registry import model_class
        for m in models:
            if m != "registration" and not model_class(P.model_of(m)[0]).supports_query_prototypes:
                raise FewShotSegError(f"--query-prototypes: model '{m}' does not take query prototypes "
                                      "(alpnet and crtpnet do)")
    checkpoints = []
    for c in args.checkpoint:
        path = Path(c).resolve()
        ckpt = load_checkpoint(path)  # fails early, naming the file
        if wants_qp and not ckpt.model.supports_query_prototypes:
            raise FewShotSegError(f"--query-prototypes: {path} holds a '{ckpt.model.name}' model, which does "
                                  "not take query prototypes (alpnet and crtpnet do)")
        checkpoints.append((f"{_safe(path.stem)}-checkpoint", path, ckpt.preprocess.size))
    data_dir = P.data_folder(args.data)
    folds = P.select_folds(P.make_folds(P.protocol_cases(data_dir)), args.folds or budget["folds"])
    wanted = [c.strip() for c in args.cases.split(",")] if args.cases else None
    plan = []
    for fold in folds:
        queries = [q for q in fold.queries if wanted is None or q in wanted][:args.max_queries]
        if not queries:
            raise FewShotSegError(f"--cases {args.cases}: none is a query scan of fold {fold.index} "
                                  f"({','.join(fold.queries)})")
        plan.append((fold, queries))
    if args.ensemble_with and any("ens" in key.split("+") for key in args.test_time):
        dirs = [setting_dir(g) for g in ([None] if "s1" in settings else []) + (args.groups if "s2" in settings else [])]
        missing = [f / f"fold_{fold.index}" / d / "model.pt" for f in args.ensemble_with for fold, _ in plan
                   for d in dirs]
        missing = [p for p in missing if not p.is_file()]
        if missing:   # before any training: a partner that is not there costs nothing
            raise FewShotSegError(f"+ens: no fold model {missing[0]} (--ensemble-with must hold "
                                  "fold_<k>/<s1|s2_a-b>/model.pt of a finished protocol run)")
    try:
        base = json.loads(Path(args.config).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FewShotSegError(f"cannot read the training config {args.config}: {exc}") from None
    return settings, models, checkpoints, data_dir, plan, base


def main(argv=None) -> int:
    args = parse(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        settings, models, checkpoints, data_dir, plan, base = prepare(args)
        variants = [""] + ["qp"] * args.query_prototypes + ["sr"] * args.support_refinement \
            + ["at"] * args.area_threshold + ["mirror"] * args.mirror_average \
            + ["blend"] * args.blend_supports + args.test_time
        variants = list(dict.fromkeys(variants))
        for model in models:
            for fold, queries in plan:
                for variant in variants if model != "registration" else [""]:
                    process(args, base, model, fold, queries, settings, data_dir, variant=variant)
        for name, path, size in checkpoints:
            args.size = size
            for fold, queries in plan:
                for variant in variants:
                    process(args, base, name, fold, queries, ["s1"], data_dir, checkpoint=path, variant=variant)
        publish(args)
    except FewShotSegError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished folds are kept and the training state is saved: "
              "run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
