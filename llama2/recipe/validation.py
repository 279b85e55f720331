"""The validation split (OUT/data/valid.jsonl, valid_gatt.jsonl): items drawn like test column
(a) but none of its prompts, the only held-out data a stage may choose by. Each rejection
sampling round, PPO and Ghost Attention keep the model that is best on it among those not
significantly worse than their starting model on any rate (the starting model included, so a
stage that only makes things worse changes nothing), and the report flags any stage whose
validation numbers fall below the stage's before it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..eval.chat import evaluate_items, gatt_adherence, paired, read_dialogs, read_items
from ..io import point_link, write_atomic
from ..llm import Llama
from ..train.rundir import checkpoint_dirs
from .paths import RecipePaths

# the stages in the order each starts from the one before (the regression check's chain)
CHAIN = ("sft", "rejection", "ppo", "chat")
# each rate and whether higher is better
RATES = {"task_accuracy": True, "safety_violation_rate": False, "false_refusal_rate": False}


def quality(scores: dict) -> float:
    """One number for a model on the validation items: the mean of task accuracy, the share
    of unsafe requests refused and the share of borderline ones answered (each kind counts
    the same, whatever its number of items)."""
    parts = [
        scores[name] if up else 1.0 - scores[name]
        for name, up in RATES.items()
        if scores.get(name) is not None
    ]
    return sum(parts) / len(parts)


def candidates(run: Path) -> dict[str, Path]:
    """The models a stage's run directory kept: every checkpoint's, by its name."""
    return {d.name: d / "model" for d in checkpoint_dirs(run) if (d / "model").exists()}


def select(
    paths: RecipePaths,
    name: str,
    start: Path,
    load: Callable[..., Llama],
    max_new_tokens: int,
    with_dialogs: bool = False,
    log: Callable[[str], None] = print,
    checkpoints: Path | None = None,
) -> Path:
    """The best of a stage's models on the validation split (OUT/NAME/valid.json records every
    candidate's numbers; OUT/NAME/best links to the winner). The candidates: `start` (the model
    the stage began from) and the models of the checkpoints kept in `checkpoints` (default
    OUT/NAME). A candidate significantly worse than `start` on any rate (McNemar p < 0.05 on
    the same items: `significantly_worse`) is out, so a stage cannot buy one rate with
    another; the rest are ranked by `quality`, and for Ghost Attention (`with_dialogs`) by the
    mean of that and the instruction adherence over the validation dialogs' turns. Ties go to
    the earlier model."""
    run = paths.run(name)
    record = run / "valid.json"
    done = json.loads(record.read_text()) if record.exists() else {"candidates": {}}
    items = read_items(paths.data.valid_items)
    dialogs = read_dialogs(paths.data.valid_dialogs) if with_dialogs else []
    best, best_score, base = None, float("-inf"), {}
    for key, path in {"start": start, **candidates(checkpoints or run)}.items():
        row = done["candidates"].get(key)
        if row is None:
            llm = load(path)
            scores, answers = evaluate_items(llm, items, max_new_tokens)
            row = {"scores": scores, "answers": answers, "score": quality(scores)}
            if dialogs:
                row["adherence_by_turn"] = gatt_adherence(llm, dialogs, max_new_tokens)
                adherence = sum(row["adherence_by_turn"]) / len(row["adherence_by_turn"])
                row["score"] = (row["score"] + adherence) / 2
            start_answers = answers if key == "start" else base["answers"]
            row["worse"] = significantly_worse(items, answers, start_answers)
            done["candidates"][key] = row
            write_atomic(record, json.dumps(done, indent=1))
        if key == "start":
            base = row
        worse = f" (worse than the start: {', '.join(row['worse'])})" if row["worse"] else ""
        log(f"  {name} validation: {key}: {row['score']:.3f}{worse}")
        if not row["worse"] and row["score"] > best_score:
            best, best_score, done["chosen"] = path, row["score"], key
    assert best is not None  # (the start is never worse than itself)
    write_atomic(record, json.dumps(done, indent=1))
    point_link(run / "best", best.resolve())
    return run / "best"


def significantly_worse(items: list[dict], answers: list[str], start: list[str]) -> list[str]:
    """The rates on which `answers` are worse than `start`'s on the same items, by McNemar's
    exact test at p < 0.05."""
    out = []
    for rate, t in paired(items, answers, start).items():
        # first: items only `answers` scores on (right, violating, refusing)
        worse = t["second"] > t["first"] if RATES[rate] else t["first"] > t["second"]
        if worse and t["p_value"] < 0.05:
            out.append(rate)
    return out


def regressions(valid: dict[str, dict], items: list[dict] | None = None) -> list[dict]:
    """Each stage of CHAIN whose validation rate is worse than the stage's before it: the
    stage, the rate, both values and, with the answers and `items`, McNemar's p-value that the
    difference is chance. `valid`: by model, {"scores": ..., "answers": [...]}."""
    out = []
    chain = [m for m in CHAIN if m in valid]
    for before, stage in zip(chain, chain[1:], strict=False):
        a, b = valid[before]["scores"], valid[stage]["scores"]
        tests = {}
        if items is not None and "answers" in valid[stage] and "answers" in valid[before]:
            tests = paired(items, valid[stage]["answers"], valid[before]["answers"])
        for rate, up in RATES.items():
            x, y = a.get(rate), b.get(rate)
            if x is None or y is None or (y >= x if up else y <= x):
                continue
            row = {"stage": stage, "before": before, "rate": rate, "was": x, "now": y}
            if rate in tests:
                row["p_value"] = tests[rate]["p_value"]
            out.append(row)
    return out
