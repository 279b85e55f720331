"""The recipe over several seeds (`llama2 recipe --seeds 0,1,2 --out DIR`): each seed's run in
DIR/seedN, and DIR/summary.json + summary.md with every headline number's mean, lowest and
highest over the seeds, and the floors judged on the means (and on each seed).

At this scale one run's numbers move by several points with the draw (the world, the
initialisation, every sample): the mean over seeds and its range say what the recipe does,
one seed says little."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..eval.stats import interval, spread
from ..io import write_atomic
from .report import COLUMN_NAMES, Floors, floors

# the numbers averaged: report.json's keys (per column) that `floors` and the headline read
# (each with the count of items it is over)
RATES = {
    "task_accuracy": "n_task",
    "safety_violation_rate": "n_unsafe",
    "false_refusal_rate": "n_borderline",
}


def mean_report(reports: list[dict]) -> dict:
    """A report whose every number is the mean over `reports` of the same number (lists
    element by element, dictionaries key by key; others taken from the first)."""

    def mean(values: list):
        first = values[0]
        if isinstance(first, bool) or first is None:
            return first
        if isinstance(first, int | float):
            nums = [v for v in values if isinstance(v, int | float)]
            return sum(nums) / len(nums) if len(nums) == len(values) else None
        if isinstance(first, dict):
            return {k: mean([v[k] for v in values if k in v]) for k in first}
        if isinstance(first, list) and all(len(v) == len(first) for v in values):
            return [mean([v[i] for v in values]) for i in range(len(first))]
        return first

    return mean(reports)


def summarize(out: Path, seeds: list[int], marks: Floors | None) -> dict:
    """DIR/summary.json and summary.md from DIR/seedN/report.json."""
    reports = {s: json.loads((out / f"seed{s}" / "report.json").read_text()) for s in seeds}
    runs = list(reports.values())
    summary: dict = {"seeds": seeds, "columns": {}, "seconds": {}}
    for c in COLUMN_NAMES:
        cols = [r["columns"][c] for r in runs]
        numbers: dict = {}
        for model in cols[0]["eval"]:
            for rate, count in RATES.items():
                values = [col["eval"][model][rate] for col in cols]
                if all(v is not None for v in values):
                    numbers[f"{model} {rate}"] = asdict(spread(values))
                    # the seeds' items pooled: k of n answers over every run
                    ns = [col["eval"][model].get(count) for col in cols]
                    if all(isinstance(n, int) for n in ns):
                        k = sum(round(v * n) for v, n in zip(values, ns, strict=True))
                        numbers[f"{model} {rate}"]["pooled"] = interval(k, sum(ns))
        for k in ("win", "tie", "loss"):
            wins = [col["win_rate"]["chat_vs_sft"][k] for col in cols]
            numbers[f"chat vs sft {k}"] = asdict(spread(wins))
        summary["columns"][c] = {
            "numbers": numbers,
            "floors_on_means": floors(mean_report(cols), marks) if marks else [],
            "floors_by_seed": {
                str(s): [f["met"] for f in r["columns"][c].get("floors", [])]
                for s, r in reports.items()
            },
        }
    summary["seconds"] = asdict(spread([r["seconds"]["total"] for r in runs]))
    summary["regressions"] = {str(s): r.get("regressions", []) for s, r in reports.items()}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    write_atomic(out / "summary.md", markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    t = summary["seconds"]
    md = [
        f"# The recipe over seeds {', '.join(map(str, seeds))}",
        "",
        f"Each number: the mean over the seeds [lowest, highest]. One run: {t['mean']:.0f} s "
        f"on average ({t['low']:.0f} to {t['high']:.0f} s).",
    ]
    for c, col in summary["columns"].items():
        md += ["", f"## Test column {COLUMN_NAMES[c]}", ""]
        md += ["| number | mean | range over seeds | 95% interval, seeds' items pooled |"]
        md.append("|---|---|---|---|")
        for name, s in col["numbers"].items():
            pooled = "-"
            if "pooled" in s:
                pooled = f"{100 * s['pooled'][0]:.1f} .. {100 * s['pooled'][1]:.1f}%"
            md.append(
                f"| {name} | {s['mean']:.1%} | {s['low']:.1%} .. {s['high']:.1%} | {pooled} |"
            )
        md += [
            "",
            "| floor (on the means) | met | measured | "
            + " | ".join(f"seed {s}" for s in seeds)
            + " |",
        ]
        md.append("|---" * (3 + len(seeds)) + "|")
        for i, f in enumerate(col["floors_on_means"]):
            by_seed = [
                ("yes" if col["floors_by_seed"][s][i] else "no")
                if i < len(col["floors_by_seed"][s])
                else "-"
                for s in map(str, seeds)
            ]
            met = "yes" if f["met"] else "**no**"
            md.append(f"| {f['floor']} | {met} | {f['measured']} | " + " | ".join(by_seed) + " |")
        met = sum(f["met"] for f in col["floors_on_means"])
        md += ["", f"Floors met on the means: {met}/{len(col['floors_on_means'])}."]
    md += ["", "## Stages that regressed on the validation split", ""]
    for s, rows in summary["regressions"].items():
        text = "; ".join(
            f"{r['stage']} {r['rate']} {r['now']:.1%} (was {r['was']:.1%})" for r in rows
        )
        md.append(f"- seed {s}: {text or 'none'}")
    return "\n".join(md) + "\n"
