"""The recipe's evaluation stage: every model of the recipe on the world's held-out items
(eval/chat.py), Ghost Attention with and without, the final model against SFT side by side,
the reward models' held-out accuracy by rating level and their agreement with the annotator on
the final model's own answers, and "fewer but better" SFT. Writes OUT/eval/*.json."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.preferences import RATINGS, read_preferences
from ..eval.chat import (
    answer_all,
    evaluate_items,
    gatt_adherence,
    read_dialogs,
    read_items,
    sample,
    win_rate,
)
from ..eval.judges import Annotator, quality
from ..io import write_atomic
from ..llm import Llama
from ..train.scoring import score_answers
from .paths import DataFiles, RecipePaths

MODELS = ("base", "sft", "rejection", "ppo", "chat")


def rm_accuracy(rm, pairs) -> dict:
    """How often the reward model scores the chosen answer above the rejected one, overall
    and by the annotator's rating (the paper's table 8)."""
    prompts = [p.prompt for p in pairs]
    chosen = score_answers(rm, prompts, [p.chosen for p in pairs])
    rejected = score_answers(rm, prompts, [p.rejected for p in pairs])
    right: dict[str, list[bool]] = {r: [] for r in RATINGS}
    for p, c, r in zip(pairs, chosen, rejected, strict=True):
        right[p.rating].append(c > r)
    every = [x for v in right.values() for x in v]
    return {
        "accuracy": sum(every) / len(every),
        "by_rating": {k: (sum(v) / len(v) if v else None) for k, v in right.items()},
        "n": len(every),
        "n_by_rating": {k: len(v) for k, v in right.items()},
    }


def rm_agreement(chat, helpful, safety, items, seed: int, max_new_tokens: int) -> dict:
    """On two sampled answers of the final model per held-out prompt, does the reward model
    prefer the one the annotator prefers? (helpfulness RM on tasks and borderline requests,
    safety RM on unsafe ones; pairs the annotator scores equal are left out)."""
    dialogs = [i["prompt"] for i in items]
    a = answer_all(chat, dialogs, max_new_tokens, temperature=1.0, seed=seed, desc="sampling a")
    b = answer_all(chat, dialogs, max_new_tokens, temperature=1.0, seed=seed + 10**6, desc="b")
    counts = {"helpful": [0, 0], "safety": [0, 0]}
    for kind, rm in (("helpful", helpful), ("safety", safety)):
        idx = [
            k for k, i in enumerate(items) if (i["check"]["kind"] == "unsafe") == (kind == "safety")
        ]
        aspect = 1 if kind == "safety" else 0
        qa = {k: quality(items[k]["check"], a[k])[aspect] for k in idx}
        qb = {k: quality(items[k]["check"], b[k])[aspect] for k in idx}
        judged = [k for k in idx if qa[k] != qb[k]]
        if not judged:
            continue
        ps = [dialogs[k] for k in judged]
        sa = score_answers(rm, ps, [a[k] for k in judged])
        sb = score_answers(rm, ps, [b[k] for k in judged])
        for k, x, y in zip(judged, sa, sb, strict=True):
            counts[kind][0] += int((x > y) == (qa[k] > qb[k]))
            counts[kind][1] += 1
    return {k: {"agreement": (c / n if n else None), "n": n} for k, (c, n) in counts.items()}


@dataclass(frozen=True)
class EvalSettings:
    seed: int
    max_new_tokens: int
    n: int  # held-out items evaluated per model (0: all)
    agreement_items: int  # held-out prompts whose answers the reward models judge
    mistake_rate: float  # the annotator's (the world's)


@dataclass
class Evaluation:
    """The evaluation's results (OUT/eval/*.json), as the report reads them."""

    scores: dict[str, dict]  # by model: eval.chat.score_items' numbers
    answers: dict[str, list[str]]  # by model: its answers to the held-out items, in order
    win_rate: dict[str, dict]  # chat_vs_sft: the annotator's win, tie and loss shares, n
    reward_models: dict[str, dict]  # helpful, safety: accuracy (by rating), agreement
    gatt: dict[str, list[float]]  # with, without: instruction adherence by turn

    @classmethod
    def read(cls, paths: RecipePaths) -> Evaluation:
        summary = json.loads(paths.eval_result("summary").read_text())
        answers = {
            m: json.loads(paths.eval_result(m).read_text())["answers"] for m in summary["eval"]
        }
        return cls(
            summary["eval"], answers, summary["win_rate"], summary["reward_models"], summary["gatt"]
        )


def held_out_items(data: DataFiles, n: int, seed: int) -> list[dict]:
    """The held-out items evaluated: `n` of them (0: all) drawn by the seed."""
    return sample(read_items(data.eval_items), n or None, seed)


def evaluate_recipe(
    paths: RecipePaths,
    load: Callable[..., Llama],
    settings: EvalSettings,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """Every model of the recipe evaluated (OUT/eval/NAME.json, each written once: a resumed
    evaluation reads what is there), the summary written; `load(path, **kw)` loads a model."""
    paths.eval.mkdir(exist_ok=True)
    seed, mnt = settings.seed, settings.max_new_tokens
    items = held_out_items(paths.data, settings.n, seed)
    dialogs = read_dialogs(paths.data.eval_gatt)
    results = Evaluation({}, {}, {}, {}, {})

    def done(name: str) -> dict | None:
        path = paths.eval_result(name)
        return json.loads(path.read_text()) if path.exists() else None

    def save(name: str, value) -> None:
        text = json.dumps(value, indent=1, ensure_ascii=False)
        write_atomic(paths.eval_result(name), text)

    for name in (*MODELS, "sft_noisy"):
        r = done(name)
        if r is None:
            log(f"  evaluating {name} on {len(items)} held-out items ...")
            llm = load(paths.model(name))
            scores, answers = evaluate_items(llm, items, mnt)
            r = {"scores": scores, "answers": answers}
            if name in ("ppo", "chat"):  # without and with Ghost Attention
                r["gatt_by_turn"] = gatt_adherence(llm, dialogs, mnt)
            save(name, r)
        results.scores[name] = r["scores"]
        results.answers[name] = r["answers"]
        line = ", ".join(f"{k} {v:.1%}" for k, v in r["scores"].items() if isinstance(v, float))
        log(f"  {name}: {line}")
        if "gatt_by_turn" in r:
            results.gatt["without" if name == "ppo" else "with"] = r["gatt_by_turn"]
    annotator = Annotator(settings.mistake_rate, seed=seed + 1)
    chat, sft = results.answers["chat"], results.answers["sft"]
    results.win_rate["chat_vs_sft"] = win_rate(items, chat, sft, annotator)
    rms = done("reward_models")
    if rms is None:
        rms = {}
        helpful = load(paths.model("rm_helpful"), dtype=torch.float32)
        safety = load(paths.model("rm_safety"), dtype=torch.float32)
        for kind, rm in (("helpful", helpful), ("safety", safety)):
            rms[kind] = rm_accuracy(rm, read_preferences(paths.data.eval_pairs(kind)))
        n = min(len(items), settings.agreement_items)
        agree_items = random.Random(seed).sample(items, n)
        agreement = rm_agreement(load(paths.model("chat")), helpful, safety, agree_items, seed, mnt)
        for kind in rms:
            rms[kind]["agreement_with_annotator"] = agreement[kind]
        save("reward_models", rms)
    results.reward_models = rms
    summary = {
        "eval": results.scores,
        "gatt": results.gatt,
        "win_rate": results.win_rate,
        "reward_models": results.reward_models,
    }
    save("summary", summary)
    return results
