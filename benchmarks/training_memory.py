"""Memory and start-up time of training's data, as a collection grows.

Two kinds of training data, each loaded the way training loads it now (memory-mapped from
a cache) and the way it did before (every volume, or every example, copied into the
process's own memory), each in a fresh process:

* few-shot training (`Training/train.py`): the pre-processed slices and superpixels of
  ../shared/data's CHAOS-T2 and TotalSegmentator CT/MR images (``ssl_default.json``'s
  images, 256 px), cached once; a start builds the episode sampler and draws episodes.
* the step network (`Training/train_stepper.py`): the examples of `Training.step_pairs`
  (``--examples``; made here from the same images, supervoxels, axial and coronal, when
  the folder is empty); a start loads them and gathers batches of 16.

Reported per process: seconds to start (the step examples' one-time consolidation apart), the private (anonymous, RssAnon) memory it holds
above the interpreter with torch imported, and its resident size (VmRSS, which counts the
shared, evictable page cache of the mapped files too). Under DDP every rank is such a
process: private memory is paid once per rank, mapped files once per machine.
Writes benchmarks/results/training_memory.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPISODES = 200
BATCHES = 200


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _images(data: Path) -> list[Path]:
    config = json.loads((ROOT / "Training" / "configs" / "ssl_default.json").read_text())
    found = []
    for pattern in config["data"]["images"]:
        pattern = pattern.replace("../shared/data", str(data))
        found += sorted(Path(p) for p in glob.glob(pattern))
    return found


def _ssl_child(data: Path, cache: Path, layout: str) -> dict:
    import numpy as np
    import torch
    from FewShotSegLib.imageio import read_image
    from FewShotSegLib.preprocessing import PreprocessConfig, prepare_volume
    from Training.episodes import AugmentConfig, EpisodeSampler, VolumeSlices
    base_anon = _status("RssAnon")
    preprocess = PreprocessConfig(size=256)
    t0 = time.perf_counter()
    volumes = []
    for path in _images(data):
        vol = VolumeSlices(path, preprocess, "axial", cache)
        if layout == "in_memory":       # what a start did before: read the scan, hold everything
            prepared = prepare_volume(read_image(path), "axial", preprocess)
            vol.slices = prepared.model_slices(list(range(prepared.shape[prepared.axis_index]))).float().contiguous()
            vol.regions = np.array(vol.regions)
        volumes.append(vol)
    sampler = EpisodeSampler(volumes, AugmentConfig(), seed=0, adjacent_probability=0.3)
    start = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(EPISODES):
        sampler.episode(step)
    return {"volumes": len(volumes), "slices": int(sum(v.slices.shape[0] for v in volumes)),
            "data_mb": round(sum(v.slices.numel() * 4 + v.regions.size * 2 for v in volumes) / 2 ** 20, 1),
            "start_seconds": round(start, 2), "episode_ms": round(1000 * (time.perf_counter() - t1) / EPISODES, 2),
            "private_mb": round(_status("RssAnon") - base_anon, 1), "resident_mb": round(_status("VmRSS"), 1),
            "torch_threads": torch.get_num_threads()}


def _step_child(examples: Path, layout: str) -> dict:
    import numpy as np
    import torch
    from Training.example_store import ExampleStore, consolidate
    base_anon = _status("RssAnon")
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    if layout == "mapped":
        consolidate(examples)
        store = ExampleStore([examples])
        count, gather = len(store), store.batch
    else:                               # what a start did before: every file into memory
        xs, ys = [], []
        for f in sorted(examples.glob("*.npz")):
            with np.load(f) as d:
                xs.append(torch.from_numpy(d["inputs"]))
                ys.append(torch.from_numpy(d["targets"]))
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        count = len(x_all)

        def gather(index):
            return x_all[index].float(), y_all[index].float()[:, None] / 255.0
    start = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(BATCHES):
        gather(torch.randint(0, count, (16,), generator=generator))
    return {"examples": count, "data_mb": round(count * (4 * 2 + 1) * 80 * 80 / 2 ** 20, 1),
            "start_seconds": round(start, 2), "batch_ms": round(1000 * (time.perf_counter() - t1) / BATCHES, 3),
            "private_mb": round(_status("RssAnon") - base_anon, 1), "resident_mb": round(_status("VmRSS"), 1)}


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__] + args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--cache", type=Path, default=None, help="superpixel cache (default: a temporary one)")
    parser.add_argument("--examples", type=Path, default=None, help="step examples (default: made in a temporary folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, where, layout = args.child
        import torch  # noqa: F401  (imported before the baseline, as training has it)
        result = _ssl_child(Path(args.data), Path(where), layout) if kind == "ssl" else _step_child(Path(where), layout)
        print(json.dumps(result))
        return 0
    import torch
    from FewShotSegLib.evaluation import shared_data_dir, write_json
    from FewShotSegLib.preprocessing import PreprocessConfig
    from Training.episodes import VolumeSlices
    from Training.provenance import hardware
    data = shared_data_dir(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        for path in _images(data):        # fill the cache first: the runs below time a later start
            VolumeSlices(path, PreprocessConfig(size=256), "axial", cache)
        examples = args.examples or Path(tmp) / "examples"
        if not any(examples.glob("*.npz")):
            subprocess.run([sys.executable, "-m", "Training.step_pairs", "--images", *map(str, _images(data)),
                            "--supervoxels", "16", "--axes", "axial,coronal", "--out", str(examples)],
                           check=True, cwd=ROOT, capture_output=True)
        from Training.example_store import consolidate
        fresh = not (examples / "examples.json").is_file()
        t0 = time.perf_counter()
        consolidate(examples)             # once per folder: the starts below find it done
        consolidated = round(time.perf_counter() - t0, 2) if fresh else None
        results = {"hardware": f"{hardware(torch.device('cpu'), 1)}, torch {torch.__version__}",
                   "episodes": EPISODES, "batches": BATCHES, "few_shot": {},
                   "step_network": {"consolidate_seconds_first_time": consolidated}}
        for layout in ("mapped", "in_memory"):
            results["few_shot"][layout] = _run_child(["--data", str(data), "--child", "ssl", str(cache), layout])
            results["step_network"][layout] = _run_child(["--child", "step", str(examples), layout])
    write_json(ROOT / "benchmarks" / "results" / "training_memory.json", results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
