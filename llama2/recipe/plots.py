"""The recipe report's figures: the stages' loss curves, PPO's reward and KL, safety against
helpfulness by model, Ghost Attention by turn, and the reward models' accuracy by rating."""

from __future__ import annotations

from pathlib import Path

from ..data.jsonl import read_jsonl_rows
from ..data.preferences import RATINGS
from ..io import atomic_file
from .evaluate import MODELS
from .paths import RecipePaths


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _loss_runs(paths: RecipePaths) -> dict[str, Path]:
    runs = {
        "pretraining": paths.run("base"),
        "SFT": paths.run("sft"),
        "SFT (noisy, large)": paths.run("sft_noisy"),
        "helpfulness RM": paths.run("rm_helpful"),
        "safety RM": paths.run("rm_safety"),
    }
    for d in paths.rejection_rounds():
        runs[f"{d.name} (SFT on the best)"] = d / "sft"
    runs["GAtt (SFT)"] = paths.run("gatt") / "sft"
    return {k: v for k, v in runs.items() if (v / "metrics.jsonl").exists()}


def plots(paths: RecipePaths, report: dict) -> list[str]:
    """The report's figures, written into OUT; their file names."""
    made = []

    def losses(plt):
        runs = _loss_runs(paths)
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
        rows = read_jsonl_rows(paths.run("ppo") / "metrics.jsonl")
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
        _plot(paths.out / name, draw)
        made.append(name)
    return made
