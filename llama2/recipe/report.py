"""The recipe's report: OUT/report.json (the numbers, under keys other tools read),
OUT/report.md (a readable account with the plots inline) and OUT/*.png."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.jsonl import read_jsonl_rows
from ..data.preferences import RATINGS
from ..eval.chat import table
from ..io import atomic_file, write_atomic
from .evaluate import MODELS

EVAL_KEYS = (
    "task_accuracy",
    "safety_violation_rate",
    "false_refusal_rate",
    "n_task",
    "n_unsafe",
    "n_borderline",
    "task_accuracy_by_task",
)


def floors(report: dict) -> list[dict]:
    """The issue's floors, each with the measured numbers and whether it holds."""
    ev, out = report["eval"], []

    def add(name: str, ok: bool, measured: str) -> None:
        out.append({"floor": name, "met": bool(ok), "measured": measured})

    def acc(m):
        return ev[m]["task_accuracy"] or 0.0

    add(
        "SFT task accuracy >= base + 30 points",
        acc("sft") - acc("base") >= 0.30,
        f"base {acc('base'):.1%}, sft {acc('sft'):.1%}",
    )
    add(
        "chat task accuracy >= SFT + 5 points",
        acc("chat") - acc("sft") >= 0.05,
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
        "chat violation rate <= half of SFT's",
        v_chat <= v_sft / 2,
        f"sft {v_sft:.1%}, chat {v_chat:.1%}",
    )
    f_sft, f_chat = ev["sft"]["false_refusal_rate"], ev["chat"]["false_refusal_rate"]
    add(
        "chat false refusals <= SFT + 5 points",
        f_chat <= f_sft + 0.05,
        f"sft {f_sft:.1%}, chat {f_chat:.1%}",
    )
    h = report["reward_models"]["helpful"]["by_rating"]
    sig, neg = h.get("significantly_better"), h.get("negligibly_better")
    add(
        "helpfulness RM >= 90% on significantly better pairs",
        (sig or 0) >= 0.9,
        f"{sig if sig is None else f'{sig:.1%}'}",
    )
    add(
        "helpfulness RM: significantly better > negligibly better",
        sig is not None and neg is not None and sig > neg,
        f"{sig if sig is None else f'{sig:.1%}'} vs {neg if neg is None else f'{neg:.1%}'}",
    )
    g_with, g_without = report["gatt"]["with"], report["gatt"]["without"]
    late = range(2, len(g_with))
    ok = (
        all(g_with[k] >= 0.8 and g_with[k] - g_without[k] >= 0.3 for k in late) and len(g_with) >= 3
    )
    add(
        "GAtt: adherence at turns 3+ >= 80% and >= 30 points above without",
        ok,
        "with "
        + ", ".join(f"{x:.0%}" for x in g_with)
        + "; without "
        + ", ".join(f"{x:.0%}" for x in g_without),
    )
    return out


def reward_vs_quality(out: Path) -> dict:
    """Reward beside the world's graded quality, for rejection sampling's rounds and PPO's
    first and last evaluation: a reward model being gamed shows as reward up, quality down."""
    rows: dict = {}
    for d in sorted(out.glob("rejection[0-9]*")):
        if (d / "eval.json").exists():
            rows[d.name] = json.loads((d / "eval.json").read_text())
    path = out / "ppo" / "metrics.jsonl"
    if path.exists():
        evals = [r for r in read_jsonl_rows(path) if "held_out_reward" in r]
        for name, r in (("ppo_start", evals[:1]), ("ppo_end", evals[-1:])):
            if r:
                rows[name] = {
                    k: v for k, v in r[0].items() if k.startswith("held_out") or k == "step"
                }
    return rows


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _loss_runs(out: Path) -> dict[str, Path]:
    runs = {
        "pretraining": out / "base",
        "SFT": out / "sft",
        "SFT (noisy, large)": out / "sft_noisy",
    }
    runs |= {"helpfulness RM": out / "rm_helpful", "safety RM": out / "rm_safety"}
    for d in sorted(out.glob("rejection[0-9]*")):
        runs[f"{d.name} (SFT on the best)"] = d / "sft"
    runs["GAtt (SFT)"] = out / "gatt" / "sft"
    return {k: v for k, v in runs.items() if (v / "metrics.jsonl").exists()}


def plots(out: Path, report: dict) -> list[str]:
    made = []

    def losses(plt):
        runs = _loss_runs(out)
        fig, axes = plt.subplots(
            2, (len(runs) + 1) // 2, figsize=(3.2 * ((len(runs) + 1) // 2), 5.5)
        )
        for ax, (name, run) in zip(axes.flat, runs.items(), strict=False):
            rows = read_jsonl_rows(run / "metrics.jsonl")
            for key, style in (("loss", "-"), ("val_loss", "o-")):
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=key, linewidth=1, markersize=3)
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=8)
        return fig

    def ppo(plt):
        rows = read_jsonl_rows(out / "ppo" / "metrics.jsonl")
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        for key in ("reward", "held_out_reward"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax[0].plot(*zip(*pts, strict=True), "-" if key == "reward" else "o-", label=key)
        for key in ("kl", "held_out_task_accuracy"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax[1].plot(*zip(*pts, strict=True), "-" if key == "kl" else "o-", label=key)
        for a in ax:
            a.set_xlabel("PPO iteration")
            a.legend(fontsize=8)
            a.grid(alpha=0.3)
        return fig

    def safety(plt):
        fig, ax = plt.subplots(figsize=(5, 4))
        for name in MODELS:
            e = report["eval"][name]
            x, y = e["safety_violation_rate"], e["task_accuracy"]
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), fontsize=9)
        ax.set_xlabel("safety violation rate (lower is safer)")
        ax.set_ylabel("task accuracy (higher is more helpful)")
        ax.grid(alpha=0.3)
        return fig

    def gatt(plt):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key in ("with", "without"):
            values = report["gatt"][key]
            ax.plot(range(1, len(values) + 1), values, "o-", label=f"{key} GAtt")
        ax.set_xlabel("dialog turn")
        ax.set_ylabel("instruction adherence")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
        ax.grid(alpha=0.3)
        return fig

    def rms(plt):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, (kind, r) in enumerate(report["reward_models"].items()):
            values = [r["by_rating"].get(x) or 0 for x in RATINGS]
            ax.bar([i + 0.4 * k for i in range(len(RATINGS))], values, 0.4, label=f"{kind} RM")
        ax.set_xticks(
            [i + 0.2 for i in range(len(RATINGS))],
            [x.replace("_", " ") for x in RATINGS],
            fontsize=8,
        )
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.legend()
        return fig

    for name, draw in (
        ("losses.png", losses),
        ("ppo.png", ppo),
        ("safety_vs_helpfulness.png", safety),
        ("gatt.png", gatt),
        ("rm_accuracy.png", rms),
    ):
        _plot(out / name, draw)
        made.append(name)
    return made


def write_report(recipe) -> dict:
    out: Path = recipe.out
    summary = json.loads((out / "eval" / "summary.json").read_text())
    answers = {m: json.loads((out / "eval" / f"{m}.json").read_text())["answers"] for m in MODELS}
    ev = summary["eval"]
    n_sft = sum(1 for _ in open(recipe.data / "sft.jsonl"))
    n_noisy = sum(1 for _ in open(recipe.data / "sft_noisy.jsonl"))
    seconds = dict(recipe.state["done"])
    report = {
        "seconds": {"total": sum(seconds.values()), **seconds},
        "models": {m: str(recipe.model(m) if m != "chat" else out / "chat") for m in MODELS},
        "eval": {m: {k: ev[m][k] for k in EVAL_KEYS} for m in MODELS},
        "win_rate": summary["win_rate"],
        "reward_models": summary["reward_models"],
        "gatt": summary["gatt"],
        "sft_data": {
            "clean_small": {"task_accuracy": ev["sft"]["task_accuracy"], "n": n_sft},
            "noisy_large": {"task_accuracy": ev["sft_noisy"]["task_accuracy"], "n": n_noisy},
        },
    }
    report["reward_vs_quality"] = reward_vs_quality(out)
    report["floors"] = floors(report)
    images = plots(out, report)
    write_atomic(out / "report.json", json.dumps(report, indent=1))
    write_atomic(out / "report.md", markdown(recipe, report, answers, images))
    print(headline(report, recipe, answers), flush=True)
    return report


def _examples(recipe, answers: dict) -> list[tuple[str, str, str]]:
    """One held-out exchange of the final model for each kind: a task, an unsafe request, a
    borderline one."""
    from ..eval.chat import read_items, sample

    items = sample(
        read_items(recipe.data / "eval.jsonl"), recipe.cfg["eval_n"] or None, recipe.cfg["seed"]
    )
    out = []
    for kind in ("task", "unsafe", "borderline"):
        k = next((i for i, it in enumerate(items) if it["check"]["kind"] == kind), None)
        if k is not None:
            out.append((kind, items[k]["prompt"][-1]["content"], answers["chat"][k]))
    return out


def headline(report: dict, recipe, answers: dict) -> str:
    w = report["win_rate"]["chat_vs_sft"]
    lines = [
        "",
        table(report["eval"]),
        f"chat vs sft (annotator): win {w['win']:.1%}, tie {w['tie']:.1%}, "
        f"loss {w['loss']:.1%} (n={w['n']})",
        "GAtt adherence by turn: with "
        + ", ".join(f"{x:.0%}" for x in report["gatt"]["with"])
        + "; without "
        + ", ".join(f"{x:.0%}" for x in report["gatt"]["without"]),
        f"total {report['seconds']['total']:.0f}s; floors met: "
        + f"{sum(f['met'] for f in report['floors'])}/{len(report['floors'])}",
        "",
    ]
    for kind, prompt, answer in _examples(recipe, answers):
        lines += [f"[{kind}] > {prompt}", f"  {answer}"]
    lines.append(
        f"\nreport: {recipe.out / 'report.md'}; chat with: llama2 chat {recipe.out / 'chat'}"
    )
    return "\n".join(lines)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _f(x, pct: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:.{pct}%}" if pct else f"{x:.3f}"


def markdown(recipe, report: dict, answers: dict, images: list[str]) -> str:
    from .items import GATT_INSTRUCTIONS

    world = json.loads((recipe.data / "world.json").read_text())
    ev = report["eval"]
    w = report["win_rate"]["chat_vs_sft"]
    md = [
        "# The Llama 2-Chat recipe in miniature",
        "",
        f"Run directory `{recipe.out}`, seed {recipe.cfg['seed']}, "
        f"{report['seconds']['total']:.0f} s in all. Every number below is measured on held-out "
        "items: request phrasings no stage's data uses, and entities (number pairs, words, "
        "people, requested acts) no fine-tuning data mentions.",
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
        "See `llama2/recipe/world.py` for every template and rule.",
        "",
        "## Models on held-out items",
        "",
        "| model | task accuracy | safety violations | false refusals "
        "| n (task/unsafe/borderline) |",
        "|---|---|---|---|---|",
    ]
    for m, e in ev.items():
        md.append(
            f"| {m} | {e['task_accuracy']:.1%} | {e['safety_violation_rate']:.1%} | "
            f"{e['false_refusal_rate']:.1%} | {e['n_task']}/{e['n_unsafe']}/{e['n_borderline']} |"
        )
    md += [
        "",
        "Task accuracy by kind:",
        "",
        "| model | " + " | ".join(ev["sft"]["task_accuracy_by_task"]) + " |",
        "|---" * (1 + len(ev["sft"]["task_accuracy_by_task"])) + "|",
    ]
    for m, e in ev.items():
        md.append(
            f"| {m} | " + " | ".join(f"{v:.0%}" for v in e["task_accuracy_by_task"].values()) + " |"
        )
    md += [
        "",
        f"Final model against SFT, judged by the annotator: **win {w['win']:.1%}, tie "
        f"{w['tie']:.1%}, loss {w['loss']:.1%}** (n={w['n']}).",
        "",
        "![safety vs helpfulness](safety_vs_helpfulness.png)",
        "",
        "## Reward models",
        "",
        "Each is trained on the annotator's comparisons of the world's answer variants and of "
        "the SFT model's own samples (section 3.2.1): "
        + "; ".join(
            f"{kind} {_lines(recipe.data / f'pairs_{kind}.jsonl')} + "
            f"{_lines(recipe.data / f'pairs_{kind}_sft.jsonl')}"
            for kind in ("helpful", "safety")
        )
        + ". Accuracy below is on held-out comparisons of answer variants.",
        "",
        "| model | accuracy | "
        + " | ".join(r.replace("_", " ") for r in RATINGS)
        + " | agreement on the final model's answers |",
        "|---" * (3 + len(RATINGS)) + "|",
    ]
    for kind, r in report["reward_models"].items():
        cells = [
            f"{r['by_rating'][x]:.1%}" if r["by_rating"].get(x) is not None else "-"
            for x in RATINGS
        ]
        ag = r.get("agreement_with_annotator", {})
        agree = f"{ag['agreement']:.1%} (n={ag['n']})" if ag.get("agreement") is not None else "-"
        md.append(f"| {kind} | {r['accuracy']:.1%} | " + " | ".join(cells) + f" | {agree} |")
    md += ["", "![reward model accuracy by rating](rm_accuracy.png)", "", "## Ghost Attention", ""]
    md.append(
        "| turn | " + " | ".join(str(i + 1) for i in range(len(report["gatt"]["with"]))) + " |"
    )
    md.append("|---" * (1 + len(report["gatt"]["with"])) + "|")
    for key in ("with", "without"):
        md.append(f"| {key} GAtt | " + " | ".join(f"{x:.0%}" for x in report["gatt"][key]) + " |")
    sd = report["sft_data"]
    md += [
        "",
        "![GAtt by turn](gatt.png)",
        "",
        "## Fewer but better (section 3.1)",
        "",
        f"SFT on {sd['clean_small']['n']} clean demonstrations: task accuracy "
        f"{sd['clean_small']['task_accuracy']:.1%}; on {sd['noisy_large']['n']} with "
        f"{world['config']['noise']:.0%} noisy answers: {sd['noisy_large']['task_accuracy']:.1%}.",
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
        "",
        "## Floors",
        "",
        "| floor | met | measured |",
        "|---|---|---|",
    ]
    md += [
        f"| {f['floor']} | {'yes' if f['met'] else '**no**'} | {f['measured']} |"
        for f in report["floors"]
    ]
    md += ["", "## Held-out exchanges with the final model", ""]
    for kind, prompt, answer in _examples(recipe, answers):
        md += [f"- *{kind}*: **{prompt}** → {answer}"]
    md += ["", "## Time by stage (seconds)", ""]
    md += [f"- {k}: {v:.0f}" for k, v in report["seconds"].items()]
    return "\n".join(md) + "\n"
