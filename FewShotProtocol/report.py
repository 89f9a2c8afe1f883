"""Turn per-fold protocol results into the published comparison: JSON, Markdown, PNGs.

Kept apart from `protocol` so the protocol itself (what is scored, how) stays short; this
module only aggregates what the folds wrote, and never re-scores anything. Every row says
which budget, steps, wall time and hardware produced it, and whether it obeyed the
protocol (a checkpoint trained on query scans did not).
"""
from __future__ import annotations

import re

import textwrap

from pathlib import Path

import numpy as np

from FewShotSegLib.overview import save_figure, save_png

from .protocol import BUDGETS, CLASSES, PAPER_ABLATION, PAPERS, SCORES, describe, family_of, mean_dice

SHORT = {"liver": "liver", "right_kidney": "R kidney", "left_kidney": "L kidney", "spleen": "spleen"}
SETTINGS = {"s1": "S1", "s2": "S2"}


def _unique(values) -> list:
    return list(dict.fromkeys(v for v in values if v not in (None, "")))


def _load_range(results: list[dict]) -> str | None:
    """'1-min load up to 3.1 (2 of 5 folds recorded)': the busiest 1-min load average while a CPU
    fold ran (older fold files did not record it)."""
    loads = [r["cpu_load"] for r in results if r.get("cpu_load") is not None and r.get("device") == "cpu"]
    if not loads:
        return None
    part = "" if len(loads) == len(results) else f" ({len(loads)} of {len(results)} folds recorded)"
    return f"1-min load up to {max(loads):.1f}{part}"


def summarise(fold_results: list[dict]) -> dict:
    """One entry per (model, setting): Dice per class and mean for EP1 / EP2 (each also +post),
    pooled over every scored scan of the folds present (each scan is in one fold only)."""
    groups: dict = {}
    for r in fold_results:
        groups.setdefault((r["model"], r["setting"]), []).append(r)
    entries = []
    for (model, setting), results in sorted(groups.items()):
        results = sorted(results, key=lambda r: r["fold"])
        rows = [row for r in results for row in r["rows"]]
        entries.append({
            "model": model, "setting": setting, "folds": [r["fold"] for r in results],
            **{key: mean_dice(rows, key) for key in SCORES},
            "per_fold": {str(r["fold"]): {"ep1": mean_dice(r["rows"], "ep1")["mean"],
                                          "ep2": mean_dice(r["rows"], "ep2")["mean"]} for r in results},
            "budget": _unique(r["budget"] for r in results), "steps": _unique(r["steps"] for r in results),
            "size": _unique(r["size"] for r in results),
            # a given checkpoint was trained once, whatever the number of folds it is scored on
            "training_seconds": round((max if all(r["budget"] == "checkpoint" for r in results) else sum)(
                r.get("training_seconds") or 0 for r in results), 1),
            "eval_seconds": round(sum(r.get("eval_seconds") or 0 for r in results), 1),
            "hardware": _unique([r.get("hardware") for r in results]
                                + [f"trained on {c['hardware']}" for r in results for c in r.get("checkpoints", [])
                                   if c.get("hardware") and c.get("hardware") != r.get("hardware")]),
            "cpu_load": _load_range(results),
            "compliant": all(r.get("compliant", True) for r in results),
            "notes": _merge_notes(n for r in results for n in r.get("notes", [])),
        })
    return {"results": entries, "same_folds": same_folds(groups),
            "papers_mean_dice_percent": {k: {"s1": v[0], "s2": v[1]} for k, v in PAPERS.items()}}


def same_folds(groups: dict) -> list:
    """Variant rows beside their model on the folds both have: an ablation trained on
    fewer folds than its model's row compares only there (fold difficulty varies by
    several points). Variants that share the same folds with the model make one table."""
    tables = []
    for model in sorted({family_of(m) for m, _ in groups if family_of(m) != m}):
        for setting in ("s1", "s2"):
            family = {m: {r["fold"]: r for r in rs} for (m, st), rs in groups.items() if st == setting
                      and family_of(m) == model}
            if model not in family:
                continue
            by_folds = {}
            for m in sorted(family):
                folds = tuple(sorted(set(family[m]) & set(family[model])))
                if m != model and folds:
                    by_folds.setdefault(folds, []).append(m)
            for folds, variants in sorted(by_folds.items(), key=lambda kv: (-len(kv[0]), kv[0])):
                rows = []
                for m in variants + [model]:
                    scored = [row for k in folds for row in family[m][k]["rows"]]
                    rows.append({"model": m, **{key: mean_dice(scored, key)["mean"] for key in SCORES},
                                 "paper": PAPER_ABLATION.get(m) if setting == "s1" else None})  # S1 only
                tables.append({"model": model, "setting": setting, "folds": list(folds), "rows": rows})
    return tables


def _without_local_paths(note: str) -> str:
    """A run folder named by its last two parts ('gpu_4k/crtpnet-ft'), not where it lay."""
    return re.sub(r"(?:\.\./|/)(?:[\w.\-]+/)+([\w.\-]+/[\w.\-]+)", r"\1", note)


def _merge_notes(notes) -> list:
    """Per-fold notes become one: a note the folds share is kept whole; notes that differ
    only in their parenthesis (the fold's scans) keep the text before it."""
    merged = {}
    for note in notes:
        merged.setdefault(note.partition(" (")[0], {})[note] = None   # dict: ordered, no repeats
    return [next(iter(whole)) if len(whole) == 1 else head for head, whole in merged.items()]


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def markdown(summary: dict, run_name: str, protocol_doc: str) -> str:
    """The comparison table: our rows (per class + means) above the papers' means."""
    head = ["method", "setting", *SHORT.values(), "EP1 mean", "EP1 + 3D post", "EP2 mean", "EP2 + 3D post",
            "folds (scans)", "budget (steps, px)", "train / eval wall", "hardware", "note"]
    lines = [f"# Few-shot protocol on CHAOS-T2 — run `{run_name}`", "",
             "Mean Dice in %, 1-way 1-shot, 5-fold cross-validation (see the protocol below). "
             "EP1 is the papers' evaluation and the only one they report; EP2 is ours to report. "
             "The '+ 3D post' columns are our option on the same predictions (largest 3D component, "
             "holes filled; see the protocol below), not the papers' scoring.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full = BUDGETS["full"]["steps"]
    if any(b != "full" for e in summary["results"] for b in e["budget"]) or any(
            s is not None and s < full for e in summary["results"] for s in e["steps"]):
        lines[4:4] = [f"Rows with fewer than the `full` budget's {full} steps per model trained far fewer "
                      "than the papers (~100k): `cpu` 3000 steps per model on a 2-core CPU; a `full` row "
                      "with fewer steps got what a GPU lease allowed; `smoke` checks the pipeline. They "
                      "are not a like-for-like comparison with the papers; rows with fewer than 20 scans "
                      "do not cover the 5 folds. 'train wall' sums the fold models' own training times "
                      "(models trained side by side took less wall time than that).", ""]
    for e in summary["results"]:
        per = e["ep1"]["per_class"]
        note = "; ".join(_without_local_paths(n) for n in e["notes"]) if e["notes"] else (
            "" if e["compliant"] else "not protocol-compliant")
        lines.append("| " + " | ".join([
            f"**{e['model']}** (ours)", SETTINGS.get(e["setting"], e["setting"]),
            *[_pct(per.get(o)) for o in SHORT], f"**{_pct(e['ep1']['mean'])}**", _pct(e["ep1_post"]["mean"]),
            _pct(e["ep2"]["mean"]),
            _pct(e["ep2_post"]["mean"]), f"{','.join(map(str, e['folds']))} ({e['ep1']['scans']})",
            f"{'/'.join(map(str, e['budget']))} ({'/'.join(map(str, e['steps']))}, "
            f"{'/'.join(map(str, e['size']))})",
            f"{_duration(e['training_seconds'])} / {_duration(e['eval_seconds'])}",
            "; ".join(e["hardware"] + ([e["cpu_load"]] if e.get("cpu_load") else [])), note]) + " |")
    for name, (s1, s2) in PAPERS.items():
        for setting, value in (("S1", s1), ("S2", s2)):
            lines.append(f"| {name} (paper) | {setting} | – | – | – | – | {value:.2f} | – | – | – | 0-4 (20) "
                         "| paper (100k steps typ.) | – | – | reported |")
    for name, value in PAPER_ABLATION.values():
        lines.append(f"| {name} (paper, Table 2 of seed 000) | S1 | – | – | – | – | {value:.2f} | – | – | – | 0-4 (20) "
                     "| paper | – | – | reported ablation |")
    for table in summary.get("same_folds", []):
        lines += ["", f"Variants of `{table['model']}` on the folds they share ({SETTINGS[table['setting']]}, folds "
                      f"{','.join(map(str, table['folds']))}; mean Dice %):", "",
                  "| row | what it changes | EP1 mean | EP1 + 3D post | EP2 mean | EP2 + 3D post "
                  "| paper (EP1, 5 folds) |", "|---|---|---|---|---|---|---|"]
        for r in table["rows"]:
            what = describe(r["model"])
            paper = f"{r['paper'][1]:.2f} ({r['paper'][0]})" if r["paper"] else "–"
            lines.append(f"| {r['model']} | {what} | {_pct(r['ep1'])} | {_pct(r['ep1_post'])} | {_pct(r['ep2'])} "
                         f"| {_pct(r['ep2_post'])} | {paper} |")
    lines += ["", "## Protocol", "", protocol_doc.strip(), ""]
    return "\n".join(lines)


def bar_chart(summary: dict, path: Path) -> Path | None:
    """Mean Dice per method and setting beside the papers'; None (with a message) when
    matplotlib is missing: the JSON and Markdown carry the same numbers."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fewshot_protocol: matplotlib is not installed; skipping the bar chart")
        return None
    ours = {}
    for e in summary["results"]:
        ours.setdefault(e["model"], {})[e["setting"]] = e
    labels, bars = [], {"S1 EP1": [], "S2 EP1": [], "S1 EP2": [], "S2 EP2": []}
    for model, by_setting in ours.items():
        wrapped = "\n".join(textwrap.wrap(model.replace("-", "- ").replace("+", " +"), 14)).replace("- ", "-").replace(" +", "+")
        folds = sorted({k for e in by_setting.values() for k in e["folds"]})
        labels.append(f"{wrapped}\n(ours)" if len(folds) >= 5 else
                      f"{wrapped}\n(ours, fold{'s' if len(folds) > 1 else ''} {','.join(map(str, folds))})")
        for key in bars:
            setting, ep = key.lower().split()
            e = by_setting.get(setting)
            value = e[ep]["mean"] if e else None
            bars[key].append(np.nan if value is None else 100 * value)
    for name, (s1, s2) in PAPERS.items():
        labels.append(name.split(" (")[0])
        for key, value in (("S1 EP1", s1), ("S2 EP1", s2), ("S1 EP2", np.nan), ("S2 EP2", np.nan)):
            bars[key].append(value)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(labels)), 4.2), dpi=110)
    width = 0.2
    for i, (key, values) in enumerate(bars.items()):
        ax.bar(x + (i - 1.5) * width, values, width, label=key, hatch="//" if "EP2" in key else None)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("mean Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title("CHAOS-T2 few-shot protocol (1-way 1-shot, 5-fold)")
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=fig.dpi)
    plt.close(fig)
    return path


def stack_images(paths: list[tuple[str, Path]], path: Path) -> Path | None:
    """One PNG of several example figures, one under the other, each with its title."""
    from PIL import Image, ImageDraw
    images = [(title, Image.open(p).convert("RGB")) for title, p in paths if Path(p).is_file()]
    if not images:
        return None
    head = 18
    width = max(im.width for _, im in images)
    canvas = Image.new("RGB", (width, sum(im.height + head for _, im in images)), (0, 0, 0))
    draw, y = ImageDraw.Draw(canvas), 0
    for title, im in images:
        draw.text((4, y + 3), title, fill=(255, 255, 0))
        canvas.paste(im, (0, y + head))
        y += im.height + head
    return save_png(canvas, path)


def class_names(values) -> str:
    return "+".join(CLASSES[v] for v in values)
