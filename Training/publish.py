"""Ship a trained checkpoint: copy it into Resources/Models with its model card.

    python Training/publish.py runs/fewshotseg-default/fewshotseg-default.pt \
        --benchmark benchmarks/results/product_fewshotseg-default_chained.json

The card (Markdown beside the .pt, and the same facts inside the checkpoint) states the
data, steps, wall time, hardware, exact command and the measured Dice.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from FewShotSegLib.checkpoints import publish_checkpoint, read_checkpoint_dict  # noqa: E402
from FewShotSegLib.model_store import sha256_of  # noqa: E402

MAX_SHIPPED_MB = 25


def render_card(name: str, payload: dict, measured: dict, sha: str, size_mb: float) -> str:
    prov, card = payload["provenance"], payload.get("card", {})
    lines = [f"# {name}", "", card.get("description", ""), "",
             "| field | value |", "|---|---|",
             f"| architecture | `{payload['model_name']}` {json.dumps(payload['model_config'])} |",
             f"| pre-processing | {json.dumps(payload['preprocess'])} |",
             f"| training | {prov.get('training', '')} |",
             f"| data | {', '.join(prov.get('data', []))} |",
             f"| steps | {prov.get('steps')} |",
             f"| wall time | {prov.get('wall_seconds', 0) / 3600:.2f} h |",
             f"| hardware | {prov.get('hardware')} |",
             f"| command | `{prov.get('command')}` |",
             f"| code version | {prov.get('code_version')} |",
             f"| torch | {prov.get('torch')} |",
             f"| file | {size_mb:.1f} MB, SHA-256 `{sha}` |", ""]
    if measured:
        lines += ["## Measured", "", measured.get("summary", ""), ""]
        if "table" in measured:
            lines += measured["table"] + [""]
    return "\n".join(lines)


def _record_in_slicer_catalog(name: str, file_name: str, sha: str) -> None:
    """The Slicer module checks shipped files against FewShotSeg/Resources/Models.json."""
    catalog_path = ROOT / "FewShotSeg" / "Resources" / "Models.json"
    if not catalog_path.is_file():
        return
    catalog = json.loads(catalog_path.read_text())
    for entry in catalog.get("models", []):
        if entry.get("name") == name:
            entry["sha256"] = sha
            entry["file"] = file_name
            break
    else:
        catalog.setdefault("models", []).append({"name": name, "file": file_name, "sha256": sha,
                                                 "description": f"{name} (shipped)"})
    catalog_path.write_text(json.dumps(catalog, indent=2) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--name", default=None, help="shipped name (default: the file's stem)")
    parser.add_argument("--benchmark", default=None, help="product benchmark JSON to quote on the card")
    parser.add_argument("--note", default="", help="a sentence added to the card's Measured section")
    args = parser.parse_args(argv)
    source = Path(args.checkpoint)
    name = args.name or source.stem
    measured = {}
    if args.benchmark:
        bench = json.loads(Path(args.benchmark).read_text())
        chaos = bench["chaos_t2"]
        organs = chaos["dice_per_organ"]
        options = bench.get("options", {})
        mode = bench["mode"]
        if mode == "chained" and options.get("registration_weight"):
            mode += f" fused with registration (weight {options['registration_weight']:g})"
        if options.get("min_intensity_agreement"):
            mode += f", intensity stop rule {options['min_intensity_agreement']:g}"
        if options.get("intensity_gate"):
            mode += ", intensity gate"
        measured = {
            "summary": (f"Product benchmark ({bench['benchmark']}), mode {mode}: CHAOS-T2 "
                        f"{chaos['cases']} volumes, mean Dice {chaos['mean_dice']:.3f}; TotalSegmentator CT "
                        f"agreement mean Dice {bench['totalseg_ct_agreement']['mean_dice']:.3f}. "
                        f"{args.note}").strip(),
            "table": ["| organ | " + " | ".join(organs) + " | mean |",
                      "|---" * (len(organs) + 2) + "|",
                      "| Dice | " + " | ".join(f"{v:.3f}" for v in organs.values())
                      + f" | {chaos['mean_dice']:.3f} |"],
            "mean_dice_chaos_t2": round(chaos["mean_dice"], 4),
            "mode": bench["mode"],
        }
    elif args.note:
        measured = {"summary": args.note}
    dest = ROOT / "Resources" / "Models" / f"{name}.pt"
    publish_checkpoint(source, dest, {"measured": measured.get("summary", "not measured yet"),
                                      "name": name})
    size_mb = dest.stat().st_size / 2**20
    if size_mb > MAX_SHIPPED_MB:
        dest.unlink()
        raise SystemExit(f"{dest.name} is {size_mb:.1f} MB: a shipped checkpoint must stay under {MAX_SHIPPED_MB} MB")
    sha = sha256_of(dest)
    payload = read_checkpoint_dict(dest)
    (dest.with_suffix(".md")).write_text(render_card(name, payload, measured, sha, size_mb))
    _record_in_slicer_catalog(name, dest.name, sha)
    print(f"{dest} ({size_mb:.1f} MB) sha256 {sha}")


if __name__ == "__main__":
    main()
