"""Train the protocol's fold models on a leased GPU machine; score them here.

A lease is short (15 minutes of device time, one command at most 10) and the machine gets
our working tree and nothing else: 64 MiB, no SimpleITK, no ImageNet-weights package, no
scans. So the work is cut in three:

    python benchmarks/protocol_on_device.py pack --models crtpnet --folds 0,1,2,3,4   # here
    # device:  python3 benchmarks/protocol_on_device.py train --minutes 8 --out $OUT   (carry .devpack)
    python benchmarks/protocol_on_device.py import /work/.device/... --run-name gpu  # here: then score

``pack`` writes ``.devpack/`` (ignored by git): every CHAOS-T2 scan as a slice pack
(`Training.slice_packs`, ~1 MB each), the backbone's ImageNet initialisation (2.8 MB) and
one training config per (row, fold, setting), built by the protocol's own
`fold_training_config`. ``train`` runs every config at once on the GPU: a first leg of
``--probe-steps`` steps measures the speed, then all resume to one common step count K
that ends inside ``--minutes`` (SSL-ALPNet's step schedule does not depend on the total,
so the resumed run is the K-step run). It returns the release checkpoints (bundled in
tars of at most 12 MiB: a lease returns 8 files of 16 MiB at most), their step logs and a
JSON of what ran. ``import`` puts them where `fewshot_protocol.py` looks for trained fold models
and prints the command that scores them (with ``--steps K``, so they are reused, not
retrained).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.model_store import sha256_of  # noqa: E402

PACK = Path(".devpack")                    # under ROOT; ignored by git, carried to the device
MANIFEST = "manifest.json"
TRAIN_SCRIPT = ROOT / "Training" / "train.py"
BACKBONE = "backbone-effnet-lite0.pt"
DEADLINE_GRACE_S = 30.0                    # past --minutes before unfinished trainings are stopped
SPEED_MARGIN = 0.9                         # the second leg plans on 90 % of the time left: one stopped run is lost
BUNDLE_BYTES = 12 * 2**20                  # files come back from the device at most 16 MiB each, 8 in all
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9.+-]+__fold_[0-9]+__s[0-9_-]+\.pt$")


def log(message: str) -> None:
    print(message, flush=True)


def _stem(row: str, fold: int, setting: str) -> str:
    return f"{row}__fold_{fold}__{setting}"


# ----------------------------------------------------------------------------- here: pack
def pack(args) -> Path:
    """Slice packs of every scan, the backbone initialisation and the fold configs."""
    from benchmarks import fewshot_protocol as FP
    from FewShotProtocol import protocol as P
    from FewShotSegLib.evaluation import write_json
    from FewShotSegLib.models.backbones import save_backbone_weights
    from FewShotSegLib.preprocessing import PreprocessConfig
    from Training.slice_packs import SUFFIX, write_pack
    from Training.train import load_config

    data_dir = P.data_folder(args.data)
    cases = P.protocol_cases(data_dir)
    folds = P.select_folds(P.make_folds(cases), args.folds)
    rows = [r.strip() for r in args.models.split(",") if r.strip()]
    from FewShotSegLib.models import available_models
    for row in rows:
        if row == "registration" or "+" in row:
            raise FewShotSegError(f"'{row}' trains nothing: pack a model or a variant")
        if P.model_of(row)[0] not in available_models():
            raise FewShotSegError(f"unknown model '{row}'; available: {', '.join(available_models())} "
                                  f"or a variant ({', '.join(P.VARIANTS)})")
    settings = [f"s{s.strip()}" for s in args.settings.split(",") if s.strip()]
    if not set(settings) <= {"s1", "s2"}:
        raise FewShotSegError(f"--settings must be 1, 2 or 1,2, not '{args.settings}'")
    base = json.loads(FP.DEFAULT_CONFIG.read_text())   # as the protocol reads it
    if load_config(FP.DEFAULT_CONFIG, {})["lr_schedule"] != "step":
        raise FewShotSegError("the probe-then-resume schedule needs lr_schedule 'step'")
    final = ROOT / PACK
    out = final.with_name(final.name + ".partial")   # the old pack stays usable until the new one is whole
    if out.exists():
        shutil.rmtree(out)
    chaos = data_dir / "chaos_t2"
    preprocess = PreprocessConfig.from_dict({**base["data"].get("preprocess", {}), "size": args.size})
    axis = base["data"].get("axis", "axial")
    for case in cases:  # every scan: some fold trains on it
        write_pack(chaos / f"image_{case}.nii.gz", out / "packs" / f"image_{case}{SUFFIX}", preprocess,
                   axis, ROOT / "cache" / "superpixels", chaos / f"label_{case}.nii.gz")
        log(f"packed image_{case}")
    save_backbone_weights(out / BACKBONE)
    fold_args = SimpleNamespace(size=args.size, steps=args.probe_steps, cache_dir=Path("cache/superpixels"),
                                threads=None, device="cuda", work_dir=Path("runs/device"))
    configs = []
    for row in rows:
        for fold in folds:
            for setting in settings:
                for group in ([None] if setting == "s1" else P.S2_GROUPS):
                    # paths relative to the config's folder: the pack works wherever it is copied
                    config = FP.fold_training_config(fold_args, base, row, fold, group, data_dir, Path("../packs"))
                    config["steps"] = args.probe_steps    # the first leg; `train` resumes to K x the row's scale
                    config["num_workers"] = args.workers
                    config["num_threads"] = args.threads   # 15 trainings share the machine's cores
                    config["amp"] = args.amp   # off: the same fp32 training as the CPU rows, only faster
                    config["checkpoint_every"] = args.probe_steps
                    config["model_config"]["backbone_weights"] = f"../{BACKBONE}"
                    name = _stem(row, fold.index, Path(config["out"]).name)
                    write_json(out / "configs" / f"{name}.json", config)
                    configs.append({"name": name, "row": row, "fold": fold.index, "setting": Path(config["out"]).name,
                                    "steps_scale": P.steps_of(row, 1), "out": config["out"]})
    files = sorted(p for p in out.rglob("*") if p.is_file())
    from Training.provenance import git_commit
    write_json(out / MANIFEST, {"configs": configs, "size": args.size, "probe_steps": args.probe_steps,
                                "code_version": git_commit(),
                                "sha256": {str(p.relative_to(out)): sha256_of(p) for p in files}})
    total = sum(p.stat().st_size for p in files) / 2**20
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    out = final
    log(f"wrote {out} ({total:.1f} MiB, {len(configs)} trainings); on the device: carry '{PACK}' and run\n"
        f"  python3 benchmarks/protocol_on_device.py train --minutes 8 --out $OUT")
    return out


# ----------------------------------------------------------------------------- device: train
def verify(folder: Path) -> dict:
    """The manifest, every file checked against its SHA-256 (a truncated copy fails here)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise FewShotSegError(f"{folder / MANIFEST} is missing or unreadable: run `pack` here first") from None
    bad = [name for name, digest in manifest["sha256"].items()
           if not (folder / name).is_file() or sha256_of(folder / name) != digest]
    if bad:
        raise FewShotSegError(f"{len(bad)} packed files are missing or differ from the manifest, e.g. {bad[0]}")
    return manifest


def _run_all(configs: list[dict], folder: Path, extra: list[str], logs: Path, deadline: float) -> list[int]:
    """Every training at once (one process each); their exit codes. At ``deadline`` (time.time())
    the ones still running are asked to stop (SIGTERM: state saved, checkpoint not final)."""
    procs = []
    for c in configs:
        handle = open(logs / f"{c['name']}.log", "a")
        procs.append((subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config",
                                        str(folder / "configs" / f"{c['name']}.json"),
                                        "--out", str(ROOT / c["out"]), *extra],
                                       cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"}), handle))
    codes = []
    for proc, handle in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            proc.terminate()
            codes.append(proc.wait())
        handle.close()
    return codes


def common_steps(probe: int, seconds_per_step: float, seconds_left: float, scale: int = 1, quantum: int = 500) -> int:
    """The step count K (a multiple of ``quantum``, at least ``probe``) that all runs reach
    in ``seconds_left`` at the slowest run's speed; ``scale``: the row's steps multiple."""
    more = int(max(0.0, seconds_left) / max(seconds_per_step, 1e-6))
    return max(probe, (probe + more) // (quantum * scale) * quantum * scale)


def bundle(checkpoints: dict[str, Path], out: Path) -> list[str]:
    """``checkpoints`` ({name: path}) into ``checkpoints_<i>.tar`` files of at most
    BUNDLE_BYTES each (a lease returns at most 8 files); the names bundled."""
    parts, size = [[]], 0
    for name, path in sorted(checkpoints.items()):
        if parts[-1] and size + path.stat().st_size > BUNDLE_BYTES:
            parts.append([])
            size = 0
        parts[-1].append((name, path))
        size += path.stat().st_size
    for i, part in enumerate(p for p in parts if p):
        with tarfile.open(out / f"checkpoints_{i}.tar", "w") as tar:
            for name, path in part:
                tar.add(path, arcname=f"{name}.pt")
    return sorted(checkpoints)


def unbundle(source: Path, into: Path) -> list[Path]:
    """The checkpoints of ``source``: its ``*.pt`` files and the members of its
    ``checkpoints_*.tar`` (plain files with a checkpoint's name only), extracted into ``into``."""
    found = sorted(source.glob("*__fold_*__*.pt"))
    for archive in sorted(source.glob("checkpoints_*.tar")):
        try:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if not (member.isfile() and CHECKPOINT_NAME.match(member.name)):
                        raise FewShotSegError(f"{archive.name} holds '{member.name}', not a returned checkpoint")
                    (into / member.name).write_bytes(tar.extractfile(member).read())
                    found.append(into / member.name)
        except tarfile.TarError as exc:
            raise FewShotSegError(f"{archive.name} is damaged: {exc}") from None
    return found


def train_on_device(args) -> dict:
    import torch
    if args.steps is not None and args.steps < 1:
        raise FewShotSegError(f"--steps must be a positive step count, not {args.steps}")
    start = time.time()
    folder = ROOT / PACK
    manifest = verify(folder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = ROOT / "runs" / "device" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    configs = manifest["configs"]
    probe = manifest["probe_steps"]
    log(f"{len(configs)} trainings, probe leg {probe} steps, GPU: "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    deadline = start + args.minutes * 60 + DEADLINE_GRACE_S
    device = ["--device", args.device]
    rates = {}
    if args.steps:   # a still-warm machine: every run continues from its saved state to --steps
        k = args.steps
        log(f"resuming all {len(configs)} to {k} steps, no probe")
        codes = _run_all(configs, folder, [*device, "--resume", "--steps", str(k)], logs, deadline)
    else:
        codes = _run_all(configs, folder, device, logs, deadline)
        if any(codes):
            raise FewShotSegError(f"a probe training failed (exit codes {codes}); see runs/device/logs")
        probe_end = time.time()
        for c in configs:   # the probe's second half: past start-up and cuDNN's autotuning
            entries = [json.loads(x) for x in (ROOT / c["out"] / "log.jsonl").read_text().splitlines()]
            timed = [e for e in entries if "step_seconds" in e]
            timed = timed[len(timed) // 2:]
            rates[c["name"]] = sum(e["step_seconds"] for e in timed) / max(len(timed), 1)
        restart = 40.0  # seconds: processes, packs and CUDA start again for the second leg
        left = (args.minutes * 60 - (probe_end - start) - restart) * SPEED_MARGIN
        k = common_steps(probe, max(rates.values()), left, max(c["steps_scale"] for c in configs))
        log(f"probe done in {probe_end - start:.0f} s; slowest {max(rates.values()) * 1000:.1f} ms/step "
            f"with all {len(configs)} running; resuming all to {k} steps")
        if k > probe:
            codes = _run_all(configs, folder, [*device, "--resume", "--steps", str(k)], logs, deadline)
    from FewShotSegLib.checkpoints import load_checkpoint
    # a finished release checkpoint comes back even where its run failed later: a second leg
    # that broke off leaves the probe's (its steps in the report; `import` wants one count)
    finished, steps_returned = {}, {}
    for c in configs:
        model = ROOT / c["out"] / "model.pt"
        provenance = load_checkpoint(model).provenance if model.is_file() else {}
        if provenance.get("final"):
            finished[c["name"]], steps_returned[c["name"]] = model, int(provenance["steps"])
    returned = bundle(finished, out)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:   # the step logs: speeds and losses, here
        for c in configs:
            for path, name in [(ROOT / c["out"] / "log.jsonl", f"{c['name']}.jsonl"),
                               (logs / f"{c['name']}.log", f"{c['name']}.log")]:
                if path.is_file():
                    tar.add(path, arcname=name)
    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "code_version": manifest.get("code_version"),
              "torch": torch.__version__, "trainings": len(configs), "probe_steps": probe, "steps": k,
              "seconds_per_step_with_all_running": rates, "wall_seconds": round(time.time() - start, 1),
              "exit_codes": codes, "returned": returned, "steps_returned": steps_returned}
    (out / "device_train.json").write_text(json.dumps(report, indent=1))
    log(json.dumps(report))
    return report


# ----------------------------------------------------------------------------- here: import
def import_models(args) -> list[Path]:
    """Returned checkpoints into runs/protocol/<run>/<row>/fold_<k>/<setting>/model.pt."""
    source = Path(args.folder)
    report = json.loads((source / "device_train.json").read_text()) if (source / "device_train.json").is_file() else {}
    with tempfile.TemporaryDirectory() as unpacked:
        return _place(source, unbundle(source, Path(unpacked)), report, args.run_name)


def _place(source: Path, paths: list[Path], report: dict, run_name: str) -> list[Path]:
    from FewShotSegLib.checkpoints import load_checkpoint
    plan, steps, sizes = [], set(), set()
    for path in paths:   # every file checked before any is placed
        row, fold, setting = path.stem.split("__")
        ckpt = load_checkpoint(path)   # weights_only; a damaged file stops here
        if not ckpt.provenance.get("final"):
            raise FewShotSegError(f"{path.name} is not a finished training")
        steps.add(int(ckpt.provenance["steps"]))
        sizes.add(int(ckpt.preprocess.size))
        plan.append((path, ROOT / "runs" / "protocol" / run_name / row / fold / setting / "model.pt"))
    if not plan:
        raise FewShotSegError(f"no <row>__fold_<k>__<setting>.pt checkpoints in {source}")
    if len(steps) != 1:
        raise FewShotSegError(f"the checkpoints stopped at different steps {sorted(steps)}: score them one by one")
    from FewShotProtocol import protocol as P
    placed = []
    for path, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        placed.append(target)
    folds = sorted({p.parts[-3].split("_")[1] for p in placed})
    settings = sorted({p.parts[-2][1] for p in placed})
    log(f"placed {len(placed)} checkpoints ({report.get('gpu') or 'device'}, {min(steps)} steps); score them with:")
    for row in sorted({p.parts[-4] for p in placed}):
        log(f"  python benchmarks/fewshot_protocol.py --budget full --device cpu --run-name {run_name} "
            f"--models {row} --folds {','.join(folds)} --settings {','.join(settings)} "
            f"--steps {min(steps) // P.steps_of(row, 1)} --size {max(sizes)}")
    return placed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="protocol_on_device", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: packs, backbone weights and fold configs into .devpack/")
    p.add_argument("--models", default="crtpnet")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--settings", default="1")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--probe-steps", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="episode-building processes per training")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each training's main process "
                   "(it mostly launches GPU work; the default, all cores each, oversubscribes the machine)")
    p.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    p.add_argument("--amp", choices=["off", "auto", "bf16", "fp16"], default="off",
                   help="mixed precision of the trainings (off: as the CPU rows were trained)")
    t = sub.add_parser("train", help="device: train every packed config, return the checkpoints")
    t.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of this command")
    t.add_argument("--out", default=os.environ.get("OUT", "out/device"))
    t.add_argument("--device", default="cuda", help="cuda (the lease) or cpu (a rehearsal here)")
    t.add_argument("--steps", type=int, default=None,
                   help="no probe: continue every run from its saved state to this many steps (a second "
                        "call while the machine is still warm: the states are there, not here)")
    i = sub.add_parser("import", help="here: place returned checkpoints for fewshot_protocol.py")
    i.add_argument("folder")
    i.add_argument("--run-name", default="gpu")
    args = parser.parse_args(argv)
    try:
        {"pack": pack, "train": train_on_device, "import": import_models}[args.command](args)
    except FewShotSegError as exc:
        print(f"protocol_on_device: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
