"""The recipe's report: OUT/report.json (the numbers, under keys other tools read),
OUT/report.md (a readable account with the plots inline) and OUT/*.png."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data.jsonl import read_jsonl_rows
from ..data.preferences import RATINGS
from ..eval.chat import RATE_KEYS, rate_text, table, win_text
from ..io import write_atomic
from .evaluate import MODELS, Evaluation
from .items import GATT_INSTRUCTIONS
from .paths import RecipePaths
from .plots import plots
from .validation import quality, regressions
from .world import COLUMNS

EVAL_KEYS = (
    "task_accuracy",
    "safety_violation_rate",
    "false_refusal_rate",
    "n_task",
    "n_unsafe",
    "n_borderline",
    "task_accuracy_by_task",
    "intervals",
)
COLUMN_NAMES = {
    "prompts": "(a) unseen prompts: phrasings no stage saw, about entities training saw",
    "entities": "(b) unseen entities: people, number pairs and acts no fine-tuning stage saw",
}


@dataclass(frozen=True)
class Floors:
    """The pass marks the report checks, each on held-out items (the recipe config's
    `floors:` section)."""

    sft_gain: float  # SFT task accuracy >= base's + this
    chat_gain: float  # chat task accuracy >= SFT's + this
    violation_ratio: float  # chat safety violation rate <= this x SFT's
    false_refusal_slack: float  # chat false refusal rate <= SFT's + this
    rm_significant: float  # helpfulness RM accuracy on significantly better pairs >= this
    gatt_adherence: float  # GAtt: instruction adherence at turns 3+ >= this
    gatt_gain: float  # and >= this above the model before GAtt


def _points(x: float) -> str:
    return f"{x * 100:g}"


def floors(report: dict, marks: Floors) -> list[dict]:
    """The floors, each with the measured numbers and whether it holds. Besides `marks`, the
    final model must win more comparisons against SFT than it loses, and the helpfulness RM
    must be right more often on significantly better pairs than on negligibly better ones."""
    ev, out = report["eval"], []

    def add(name: str, ok: bool, measured: str) -> None:
        out.append({"floor": name, "met": bool(ok), "measured": measured})

    def acc(m):
        return ev[m]["task_accuracy"] or 0.0

    add(
        f"SFT task accuracy >= base + {_points(marks.sft_gain)} points",
        acc("sft") - acc("base") >= marks.sft_gain,
        f"base {acc('base'):.1%}, sft {acc('sft'):.1%}",
    )
    add(
        f"chat task accuracy >= SFT + {_points(marks.chat_gain)} points",
        acc("chat") - acc("sft") >= marks.chat_gain,
        f"sft {acc('sft'):.1%}, chat {acc('chat'):.1%}",
    )
    w = report["win_rate"]["chat_vs_sft"]
    add(
        "chat wins > losses against SFT",
        w["win"] > w["loss"],
        f"win {w['win']:.1%}, tie {w['tie']:.1%}, loss {w['loss']:.1%}",
    )
    v_sft, v_chat = ev["sft"]["safety_violation_rate"], ev["chat"]["safety_violation_rate"]
    add(
        f"chat violation rate <= {marks.violation_ratio:.0%} of SFT's",
        v_chat <= v_sft * marks.violation_ratio,
        f"sft {v_sft:.1%}, chat {v_chat:.1%}",
    )
    f_sft, f_chat = ev["sft"]["false_refusal_rate"], ev["chat"]["false_refusal_rate"]
    add(
        f"chat false refusals <= SFT + {_points(marks.false_refusal_slack)} points",
        f_chat <= f_sft + marks.false_refusal_slack,
        f"sft {f_sft:.1%}, chat {f_chat:.1%}",
    )
    h = report["reward_models"]["helpful"]["by_rating"]
    sig, neg = h.get("significantly_better"), h.get("negligibly_better")
    add(
        f"helpfulness RM >= {marks.rm_significant:.0%} on significantly better pairs",
        (sig or 0) >= marks.rm_significant,
        f"{sig if sig is None else f'{sig:.1%}'}",
    )
    add(
        "helpfulness RM: significantly better > negligibly better",
        sig is not None and neg is not None and sig > neg,
        f"{sig if sig is None else f'{sig:.1%}'} vs {neg if neg is None else f'{neg:.1%}'}",
    )
    g_with, g_without = report["gatt"]["with"], report["gatt"]["without"]
    late = range(2, len(g_with))
    ok = len(g_with) >= 3 and all(
        g_with[k] >= marks.gatt_adherence and g_with[k] - g_without[k] >= marks.gatt_gain
        for k in late
    )
    add(
        f"GAtt: adherence at turns 3+ >= {marks.gatt_adherence:.0%} and >= "
        f"{_points(marks.gatt_gain)} points above without",
        ok,
        "with "
        + ", ".join(f"{x:.0%}" for x in g_with)
        + "; without "
        + ", ".join(f"{x:.0%}" for x in g_without),
    )
    return out


def reward_vs_quality(paths: RecipePaths) -> dict:
    """Reward beside the world's graded quality, for rejection sampling's rounds and PPO's
    first and last evaluation: a reward model being gamed shows as reward up, quality down."""
    rows: dict = {}
    for d in paths.rejection_rounds():
        if (d / "eval.json").exists():
            rows[d.name] = json.loads((d / "eval.json").read_text())
    path = paths.run("ppo") / "metrics.jsonl"
    if path.exists():
        evals = [r for r in read_jsonl_rows(path) if "held_out_reward" in r]
        for name, r in (("ppo_start", evals[:1]), ("ppo_end", evals[-1:])):
            if r:
                rows[name] = {
                    k: v for k, v in r[0].items() if k.startswith("held_out") or k == "step"
                }
    return rows


def column_report(results: Evaluation, column: str) -> dict:
    """The numbers measured on one test column, under the keys `floors` reads."""
    ev = results.scores[column]
    rms = results.reward_models
    return {
        "eval": {m: {k: ev[m][k] for k in EVAL_KEYS} for m in MODELS},
        "win_rate": {"chat_vs_sft": results.win_rate[column]},
        "paired": {"chat_vs_sft": results.paired[column]},
        "gatt": results.gatt[column],
        "reward_models": {
            kind: {**r[column], "agreement_with_annotator": r["agreement_with_annotator"]}
            for kind, r in rms.items()
        },
    }


def write_report(
    paths: RecipePaths,
    results: Evaluation,
    items: list[dict],
    valid_items: list[dict],
    seconds: dict[str, float],
    marks: Floors | None,
    seed: int,
) -> dict:
    """OUT/report.json, report.md and the figures from the evaluation's results (`items`: the
    column (a) test items it answered, in order; `valid_items`: the validation split's;
    `seconds`: by stage); the headline printed. The top-level numbers are column (a)'s, the
    one the floors judge; `columns` holds both."""
    columns = {c: column_report(results, c) for c in COLUMNS}
    report = {
        "seconds": {"total": sum(seconds.values()), **seconds},
        "models": {m: str(paths.model(m)) for m in MODELS},
        **columns["prompts"],
        "columns": columns,
        "valid": {m: v["scores"] for m, v in results.valid.items()},
        "valid_quality": {m: quality(v["scores"]) for m, v in results.valid.items()},
        "regressions": regressions(results.valid, valid_items),
        "sft_data": {
            "clean_small": {
                "task_accuracy": results.scores["prompts"]["sft"]["task_accuracy"],
                "n": _lines(paths.data.sft),
            },
            "noisy_large": {
                "task_accuracy": results.scores["prompts"]["sft_noisy"]["task_accuracy"],
                "n": _lines(paths.data.sft_noisy),
            },
        },
    }
    report["reward_vs_quality"] = reward_vs_quality(paths)
    if marks is not None:
        report["floors"] = floors(report, marks)
        for c in COLUMNS:
            columns[c]["floors"] = floors(columns[c], marks)
    else:
        report["floors"] = []
    images = plots(paths, report)
    shown = examples(items, results.answers["prompts"]["chat"])
    write_atomic(paths.report, json.dumps(report, indent=1))
    write_atomic(paths.report_md, markdown(paths, report, shown, images, seed))
    print(headline(report, paths, shown), flush=True)
    return report


def examples(items: list[dict], answers: list[str]) -> list[tuple[str, str, str]]:
    """One held-out exchange of the final model for each kind: a task, an unsafe request, a
    borderline one, as (kind, prompt, answer)."""
    out = []
    for kind in ("task", "unsafe", "borderline"):
        k = next((i for i, it in enumerate(items) if it["check"]["kind"] == kind), None)
        if k is not None:
            out.append((kind, items[k]["prompt"][-1]["content"], answers[k]))
    return out


def headline(report: dict, paths: RecipePaths, shown: list[tuple[str, str, str]]) -> str:
    lines = [""]
    for c, col in report["columns"].items():
        w = col["win_rate"]["chat_vs_sft"]
        g = col["gatt"]
        lines += [
            f"test column {COLUMN_NAMES[c]} (95% intervals):",
            table(col["eval"]),
            f"chat vs sft (annotator): {win_text(w)}",
            "GAtt adherence by turn: with "
            + ", ".join(f"{x:.0%}" for x in g["with"])
            + "; without "
            + ", ".join(f"{x:.0%}" for x in g["without"]),
            "",
        ]
    lines.append(
        f"total {report['seconds']['total']:.0f}s; floors met (column a): "
        + f"{sum(f['met'] for f in report['floors'])}/{len(report['floors'])}"
    )
    for r in report["regressions"]:
        lines.append(f"REGRESSION on validation: {_regression_text(r)}")
    lines.append("")
    for kind, prompt, answer in shown:
        lines += [f"[{kind}] > {prompt}", f"  {answer}"]
    lines.append(f"\nreport: {paths.report_md}; chat with: llama2 chat {paths.model('chat')}")
    return "\n".join(lines)


def _regression_text(r: dict) -> str:
    p = f" (McNemar p={r['p_value']:.3g})" if "p_value" in r else ""
    return f"{r['stage']} {r['rate']} {r['now']:.1%} against {r['before']}'s {r['was']:.1%}{p}"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _f(x, pct: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:.{pct}%}" if pct else f"{x:.3f}"


def markdown(
    paths: RecipePaths,
    report: dict,
    shown: list[tuple[str, str, str]],
    images: list[str],
    seed: int,
) -> str:
    world = json.loads(paths.data.manifest.read_text())
    md = [
        "# The Llama 2-Chat recipe in miniature",
        "",
        f"Run directory `{paths.out}`, seed {seed}, "
        f"{report['seconds']['total']:.0f} s in all. Every number below is measured on test "
        "items no stage trained on, in two columns: "
        + "; ".join(COLUMN_NAMES.values())
        + ". The floors are judged on (a). Rates carry their 95% Wilson intervals; a "
        "difference between two models on the same items carries McNemar's exact p-value. "
        "Choices (PPO's and Ghost Attention's checkpoint) are made on a separate validation "
        "split.",
        "",
        "## The world",
        "",
        f"Tasks (addition, the larger of two numbers, the last number of a list, where a person "
        f"lives, a person's job), unsafe requests in five categories, borderline requests, and "
        f"{len(GATT_INSTRUCTIONS)} checkable system instructions. Data written to `data/`: "
        + ", ".join(f"`{k}` ({v})" for k, v in world["files"].items())
        + f"; {world['documents']} pretraining documents beside the standard library. "
        "A simulated annotator compares answers on helpfulness or safety, grades the difference "
        f"on the paper's four levels and errs as people do, on close calls (on a share "
        f"{world['config']['mistake_rate']} of them, fewer as the answers differ more). "
        "Some training entities (people, number pairs, acts) appear only in the RLHF stages' "
        "prompts, never in the SFT demonstrations. "
        "See `llama2/recipe/vocabulary.yaml` and `items.py` for every template and rule.",
    ]
    for c, col in report["columns"].items():
        md += _column_markdown(c, col)
    md += ["", "Column (a):", "", "![safety vs helpfulness](safety_vs_helpfulness.png)", ""]
    md += ["![GAtt by turn](gatt.png)", ""]
    md += _reward_model_markdown(paths, report)
    sd = report["sft_data"]
    md += [
        "",
        "## Fewer but better (section 3.1)",
        "",
        f"SFT on {sd['clean_small']['n']} clean demonstrations: task accuracy "
        f"{sd['clean_small']['task_accuracy']:.1%}; on {sd['noisy_large']['n']} with "
        f"{world['config']['noise']:.0%} noisy answers: {sd['noisy_large']['task_accuracy']:.1%} "
        "(column a).",
        "",
        "## Validation split: each stage against the one before",
        "",
        "| model | task accuracy | violations | false refusals | quality |",
        "|---|---|---|---|---|",
    ]
    for m, v in report["valid"].items():
        cells = " | ".join(rate_text(v, k) for k in RATE_KEYS)
        md.append(f"| {m} | {cells} | {report['valid_quality'][m]:.3f} |")
    md.append("")
    if report["regressions"]:
        md += [f"- **regression**: {_regression_text(r)}" for r in report["regressions"]]
    else:
        md.append("No stage is worse than the stage before it on any validation rate.")
    md += [
        "",
        "## PPO and the stages' curves",
        "",
        "![PPO](ppo.png)",
        "",
        "![losses](losses.png)",
        "",
        "## Reward beside quality (rejection sampling and PPO)",
        "",
        "Mean reward (raw R_c) and the world's graded task accuracy: of the sampled answers "
        "(training prompts), and of greedy answers to the stage's held-out prompts before and "
        "after its fine-tuning (rejection) or at PPO's first and last evaluation.",
        "",
        "| stage | reward | task accuracy | held-out reward | held-out task accuracy "
        "| after tuning |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {_f(r.get('samples_reward'))} | {_f(r.get('samples_task_accuracy'), 1)} "
            f"| {_f(r.get('held_out_reward'))} | {_f(r.get('held_out_task_accuracy'), 1)} "
            f"| {_f(r.get('tuned_held_out_task_accuracy'), 1)} |"
            for name, r in report["reward_vs_quality"].items()
        ],
    ]
    for c, col in report["columns"].items():
        md += ["", f"## Floors, column {COLUMN_NAMES[c][:3]}", ""]
        md += ["| floor | met | measured |", "|---|---|---|"]
        md += [
            f"| {f['floor']} | {'yes' if f['met'] else '**no**'} | {f['measured']} |"
            for f in col.get("floors", [])
        ]
    md += ["", "## Test exchanges with the final model (column a)", ""]
    for kind, prompt, answer in shown:
        md += [f"- *{kind}*: **{prompt}** → {answer}"]
    md += ["", "## Time by stage (seconds)", ""]
    md += [f"- {k}: {v:.0f}" for k, v in report["seconds"].items()]
    return "\n".join(md) + "\n"


def _column_markdown(column: str, col: dict) -> list[str]:
    ev, w = col["eval"], col["win_rate"]["chat_vs_sft"]
    md = [
        "",
        f"## Models on test column {COLUMN_NAMES[column]}",
        "",
        "| model | task accuracy | safety violations | false refusals "
        "| n (task/unsafe/borderline) |",
        "|---|---|---|---|---|",
    ]
    for m, e in ev.items():
        cells = " | ".join(rate_text(e, k) for k in RATE_KEYS)
        md.append(f"| {m} | {cells} | {e['n_task']}/{e['n_unsafe']}/{e['n_borderline']} |")
    kinds = list(ev["sft"]["task_accuracy_by_task"])
    md += ["", "Task accuracy by kind:", "", "| model | " + " | ".join(kinds) + " |"]
    md.append("|---" * (1 + len(kinds)) + "|")
    for m, e in ev.items():
        by = e["task_accuracy_by_task"]
        md.append(f"| {m} | " + " | ".join(f"{by[k]:.0%}" for k in kinds if k in by) + " |")
    md += ["", f"Final model against SFT, judged by the annotator: **{win_text(w)}**.", ""]
    tests = col["paired"]["chat_vs_sft"]
    md += [
        "Paired on the same items (McNemar): "
        + "; ".join(
            f"{k.replace('_', ' ')}: {t['first']} items only chat, {t['second']} only SFT, "
            f"p={t['p_value']:.3g}"
            for k, t in tests.items()
        )
        + ".",
        "",
        "Ghost Attention, instruction adherence by turn:",
        "",
    ]
    g = col["gatt"]
    md.append("| turn | " + " | ".join(str(i + 1) for i in range(len(g["with"]))) + " |")
    md.append("|---" * (1 + len(g["with"])) + "|")
    for key in ("with", "without"):
        md.append(f"| {key} GAtt | " + " | ".join(f"{x:.0%}" for x in g[key]) + " |")
    return md


def _reward_model_markdown(paths: RecipePaths, report: dict) -> list[str]:
    md = [
        "## Reward models",
        "",
        "Each is trained on the annotator's comparisons of the world's answer variants and of "
        "the policy's own samples, round by round (section 3.2.1; each later round's reward "
        "model continues from the one before on the new comparisons). Accuracy below is on "
        "test comparisons of answer variants (the last round's models).",
        "",
        "| model | column | accuracy | "
        + " | ".join(r.replace("_", " ") for r in RATINGS)
        + " | agreement on the final model's answers |",
        "|---" * (4 + len(RATINGS)) + "|",
    ]
    for c, col in report["columns"].items():
        for kind, r in col["reward_models"].items():
            cells = [
                f"{r['by_rating'][x]:.1%}" if r["by_rating"].get(x) is not None else "-"
                for x in RATINGS
            ]
            ag = r.get("agreement_with_annotator", {})
            agree = (
                f"{ag['agreement']:.1%} (n={ag['n']})" if ag.get("agreement") is not None else "-"
            )
            low, high = r.get("interval", (r["accuracy"], r["accuracy"]))
            acc = f"{r['accuracy']:.1%} [{100 * low:.1f}, {100 * high:.1f}]"
            md.append(f"| {kind} | {c} | {acc} | " + " | ".join(cells) + f" | {agree} |")
    md += ["", "![reward model accuracy by rating](rm_accuracy.png)"]
    return md
