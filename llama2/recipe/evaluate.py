"""The recipe's evaluation stage: every model of the recipe on the world's two test columns
(world.COLUMNS: (a) unseen prompts, (b) unseen entities) and on the validation split
(eval/chat.py), Ghost Attention with and without, the final model against SFT side by side
with a paired test, the reward models' test accuracy by rating level and their agreement with
the annotator on the final model's own answers, and "fewer but better" SFT. Writes
OUT/eval/*.json."""

from __future__ import annotations

import dataclasses
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
    paired,
    read_dialogs,
    read_items,
    sample,
    win_rate,
)
from ..eval.judges import Annotator, quality
from ..eval.stats import interval
from ..io import write_atomic
from ..llm import Llama
from ..train.scoring import score_answers
from .paths import DataFiles, RecipePaths
from .world import COLUMNS

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
        "interval": interval(sum(every), len(every)),
        "by_rating": {k: (sum(v) / len(v) if v else None) for k, v in right.items()},
        "n": len(every),
        "n_by_rating": {k: len(v) for k, v in right.items()},
        "intervals_by_rating": {k: interval(sum(v), len(v)) for k, v in right.items() if v},
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
    n: int  # test items evaluated per model and column (0: all)
    agreement_items: int  # test prompts (column a) whose answers the reward models judge
    mistake_rate: float  # the annotator's (the world's)


@dataclass
class Evaluation:
    """The evaluation's results (OUT/eval/*.json), as the report reads them. By test column
    (world.COLUMNS) where a number is measured on test items."""

    scores: dict[str, dict[str, dict]]  # column -> model -> eval.chat.score_items' numbers
    answers: dict[str, dict[str, list[str]]]  # column -> model -> its answers, in order
    valid: dict[str, dict]  # model -> {"scores", "answers"} on the validation split
    win_rate: dict[str, dict]  # column -> the annotator's chat-vs-SFT win, tie, loss shares
    paired: dict[str, dict]  # column -> eval.chat.paired (chat against SFT)
    reward_models: dict[str, dict]  # helpful, safety -> column -> accuracy; agreement
    gatt: dict[str, dict[str, list[float]]]  # column -> with, without -> adherence by turn

    @classmethod
    def read(cls, paths: RecipePaths) -> Evaluation:
        return cls(**json.loads(paths.eval_result("summary").read_text()))


def test_items(data: DataFiles, column: str, n: int, seed: int) -> list[dict]:
    """The test items of a column evaluated: `n` of them (0: all) drawn by the seed."""
    return sample(read_items(data.test_items(column)), n or None, seed)


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
    items = {c: test_items(paths.data, c, settings.n, seed) for c in COLUMNS}
    dialogs = {c: read_dialogs(paths.data.test_dialogs(c)) for c in COLUMNS}
    valid_items = read_items(paths.data.valid_items)
    results = Evaluation({c: {} for c in COLUMNS}, {c: {} for c in COLUMNS}, {}, {}, {}, {}, {})

    def done(name: str) -> dict | None:
        path = paths.eval_result(name)
        return json.loads(path.read_text()) if path.exists() else None

    def save(name: str, value) -> None:
        text = json.dumps(value, indent=1, ensure_ascii=False)
        write_atomic(paths.eval_result(name), text)

    for name in (*MODELS, "sft_noisy"):
        r = done(name)
        if r is None:
            llm = load(paths.model(name))
            r = {"columns": {}, "gatt_by_turn": {}}
            for c in COLUMNS:
                log(f"  evaluating {name} on {len(items[c])} test items (unseen {c}) ...")
                scores, answers = evaluate_items(llm, items[c], mnt)
                r["columns"][c] = {"scores": scores, "answers": answers}
                if name in ("ppo", "chat"):  # without and with Ghost Attention
                    r["gatt_by_turn"][c] = gatt_adherence(llm, dialogs[c], mnt)
            if name != "base":  # (the stages' chain, for the regression check)
                scores, answers = evaluate_items(llm, valid_items, mnt)
                r["valid"] = {"scores": scores, "answers": answers}
            save(name, r)
        for c in COLUMNS:
            got = r["columns"][c]
            results.scores[c][name] = got["scores"]
            results.answers[c][name] = got["answers"]
            line = ", ".join(
                f"{k} {v:.1%}" for k, v in got["scores"].items() if isinstance(v, float)
            )
            log(f"  {name} (unseen {c}): {line}")
            if c in r["gatt_by_turn"]:
                key = "without" if name == "ppo" else "with"
                results.gatt.setdefault(c, {})[key] = r["gatt_by_turn"][c]
        if "valid" in r:
            results.valid[name] = r["valid"]
    annotator = Annotator(settings.mistake_rate, seed=seed + 1)
    for c in COLUMNS:
        chat, sft = results.answers[c]["chat"], results.answers[c]["sft"]
        results.win_rate[c] = win_rate(items[c], chat, sft, annotator)
        results.paired[c] = paired(items[c], chat, sft)
    rms = done("reward_models")
    if rms is None:
        rms = {}
        helpful = load(paths.reward_model("helpful"), dtype=torch.float32)
        safety = load(paths.reward_model("safety"), dtype=torch.float32)
        for kind, rm in (("helpful", helpful), ("safety", safety)):
            rms[kind] = {
                c: rm_accuracy(rm, read_preferences(paths.data.test_pairs(kind, c)))
                for c in COLUMNS
            }
        first = items["prompts"]
        n = min(len(first), settings.agreement_items)
        agree_items = random.Random(seed).sample(first, n)
        agreement = rm_agreement(load(paths.model("chat")), helpful, safety, agree_items, seed, mnt)
        for kind in rms:
            rms[kind]["agreement_with_annotator"] = agreement[kind]
        save("reward_models", rms)
    results.reward_models = rms
    save("summary", dataclasses.asdict(results))
    return results
