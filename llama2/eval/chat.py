"""`llama2 eval chat`: a chat model measured on held-out items whose answers a program can
judge (judges.py), in the terms of the Llama 2 paper's tables: task accuracy, safety
violation rate and false-refusal rate (section 4.4), instruction adherence by turn for Ghost
Attention (section 3.3, figure 28), and win / tie / loss against another model as judged by
the simulated annotator (section 3.4.2's human evaluation).

Items are JSONL rows {"prompt": messages, "check": {...}} (recipe/world.py writes them to
OUT/data/eval.jsonl) and dialogs {"turns": [...], "instruction": text} (eval_gatt.jsonl).
Generation is greedy and batched.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..data.gatt import read_turns
from ..data.jsonl import parse_prompt, read_jsonl
from ..formats import DialogError
from ..llm import Llama
from .judges import Annotator, follows_instruction, grade
from .stats import interval, mcnemar, sign_test

# the keys of an evaluation (report.json's "eval" entries use them)
RATE_KEYS = {
    "task_accuracy": "task_accuracy",
    "safety_violation_rate": "safety_violation",
    "false_refusal_rate": "false_refusal",
}


def read_items(path: str | Path) -> list[dict]:
    """Evaluation items: {"prompt": text or messages, "check": {"kind": ...}}."""
    out = []
    for where, r in read_jsonl(path):
        prompt = parse_prompt(r, where)
        check = r.get("check")
        if not isinstance(check, dict) or check.get("kind") not in ("task", "unsafe", "borderline"):
            raise DialogError(
                f"{where}: field 'check' must be an object with kind task, unsafe or borderline"
            )
        out.append({"prompt": prompt, "check": check})
    if not out:
        raise DialogError(f"{path}: no items")
    return out


def read_dialogs(path: str | Path) -> list[dict]:
    """GAtt evaluation dialogs: data/gatt.py's format, the instruction required."""
    out = read_turns(path)
    for n, d in enumerate(out, 1):
        if d["instruction"] is None:
            raise DialogError(f"{path}: dialog {n}: field 'instruction' must be text")
    return out


def sample(items: Sequence, n: int | None, seed: int) -> list:
    """n items drawn without replacement by `seed` (all, in order, when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    return random.Random(seed).sample(list(items), n)


def answer_all(
    llm: Llama,
    dialogs: Sequence[list[dict]],
    max_new_tokens: int = 48,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    desc: str = "answering",
) -> list[str]:
    """Answers to dialogs, in batches (greedy by default)."""
    out: list[str] = []
    bar = tqdm(total=len(dialogs), desc=desc, unit="prompt", leave=False)
    for i in range(0, len(dialogs), batch_size):
        done = llm.chat(
            list(dialogs[i : i + batch_size]),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + i,
        )
        out += [c.text for c in done]
        bar.update(len(done))
    bar.close()
    return out


def score_items(items: Sequence[dict], answers: Sequence[str]) -> dict:
    """The rates over items (each over the items it applies to) and the counts."""
    sums: dict[str, list[float]] = {}
    by_task: dict[str, list[float]] = {}
    for item, answer in zip(items, answers, strict=True):
        for key, value in grade(item["check"], answer).items():
            sums.setdefault(key, []).append(value)
            if key == "task_accuracy":
                by_task.setdefault(item["check"]["task"], []).append(value)
    kinds = [i["check"]["kind"] for i in items]
    out = {
        name: (sum(sums[key]) / len(sums[key]) if sums.get(key) else None)
        for name, key in RATE_KEYS.items()
    }
    out |= {
        "n_task": kinds.count("task"),
        "n_unsafe": kinds.count("unsafe"),
        "n_borderline": kinds.count("borderline"),
        "task_accuracy_by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
        # 95% Wilson intervals of the rates (stats.wilson)
        "intervals": {
            name: interval(round(sum(sums[key])), len(sums[key]))
            for name, key in RATE_KEYS.items()
            if sums.get(key)
        },
    }
    return out


def outcomes(items: Sequence[dict], answers: Sequence[str]) -> dict[str, list[bool | None]]:
    """Per item and rate, the grade (None where the rate does not apply to the item)."""
    out: dict[str, list[bool | None]] = {name: [] for name in RATE_KEYS}
    for item, answer in zip(items, answers, strict=True):
        graded = grade(item["check"], answer)
        for name, key in RATE_KEYS.items():
            out[name].append(bool(graded[key]) if key in graded else None)
    return out


def paired(items: Sequence[dict], answers: Sequence[str], against: Sequence[str]) -> dict:
    """McNemar's exact test per rate between two models' answers to the same items: `first`
    items only `answers` scores on (answered right, violated, refused), `second` only
    `against`, and the p-value that the difference is chance."""
    a, b = outcomes(items, answers), outcomes(items, against)
    out = {}
    for name in RATE_KEYS:
        both = [(x, y) for x, y in zip(a[name], b[name], strict=True) if x is not None]
        if both:
            t = mcnemar([x for x, _ in both], [y for _, y in both])
            out[name] = {"first": t.first, "second": t.second, "p_value": t.p_value}
    return out


def evaluate_items(
    llm: Llama, items: Sequence[dict], max_new_tokens: int = 48
) -> tuple[dict, list[str]]:
    answers = answer_all(llm, [i["prompt"] for i in items], max_new_tokens)
    return score_items(items, answers), answers


def gatt_adherence(
    llm: Llama, dialogs: Sequence[dict], max_new_tokens: int = 48, batch_size: int = 64
) -> list[float]:
    """Share of answers that honour the system instruction at each turn, the instruction given
    once, in the first turn (section 3.3); dialogs advance together, a batch per turn."""
    turns = max(len(d["turns"]) for d in dialogs)
    history: list[list[dict]] = [[] for _ in dialogs]
    honoured: list[list[bool]] = [[] for _ in range(turns)]
    for k in range(turns):
        live = [i for i, d in enumerate(dialogs) if k < len(d["turns"])]
        for i in live:
            turn = dialogs[i]["turns"][k]
            text = f"{dialogs[i]['instruction']}\n\n{turn}" if k == 0 else turn
            history[i].append({"role": "user", "content": text})
        answers = answer_all(
            llm, [history[i] for i in live], max_new_tokens, batch_size, desc=f"turn {k + 1}"
        )
        for i, a in zip(live, answers, strict=True):
            history[i].append({"role": "assistant", "content": a})
            honoured[k].append(bool(follows_instruction(dialogs[i], a)))
    return [sum(h) / len(h) for h in honoured]


def win_rate(
    items: Sequence[dict],
    answers: Sequence[str],
    against: Sequence[str],
    annotator: Annotator | None = None,
) -> dict:
    """Side by side (section 3.4.2): the annotator judges each pair overall; a difference it
    grades "negligibly better / unsure" is a tie, as are identical answers."""
    annotator = annotator or Annotator()
    win = tie = loss = 0
    for item, a, b in zip(items, answers, against, strict=True):
        better, level = annotator.compare(item["check"], a, b, "overall")
        if a == b or level == "negligibly_better":
            tie += 1
        elif better == 0:
            win += 1
        else:
            loss += 1
    n = len(items)
    counts = {"win": win, "tie": tie, "loss": loss}
    return {
        **{k: c / n for k, c in counts.items()},
        "n": n,
        "intervals": {k: interval(c, n) for k, c in counts.items()},
        "p_value": sign_test(win, loss),  # that wins and losses are equally likely
    }


def evaluate(
    llm: Llama,
    items: Sequence[dict],
    dialogs: Sequence[dict] = (),
    against: Llama | None = None,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> dict:
    """Everything `llama2 eval chat` reports for one model (and, with `against`, the
    side-by-side)."""
    result, answers = evaluate_items(llm, items, max_new_tokens)
    if dialogs:
        result["gatt_by_turn"] = gatt_adherence(llm, dialogs, max_new_tokens)
    if against is not None:
        other, other_answers = evaluate_items(against, items, max_new_tokens)
        result["against"] = other
        result["win_rate"] = win_rate(items, answers, other_answers, Annotator(seed=seed))
        result["paired"] = paired(items, answers, other_answers)
    result["examples"] = [
        {"prompt": i["prompt"][-1]["content"], "answer": a, **grade(i["check"], a)}
        for i, a in zip(items, answers, strict=True)
    ]
    return result


def table(rows: dict[str, dict]) -> str:
    """A text table of models' rates (percent, with their 95% intervals when the rows carry
    them) and counts."""
    head = f"{'model':12s} {'task accuracy':>20s} {'violations':>20s} {'false refusals':>20s}"
    head += "  n (task/unsafe/borderline)"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        counts = f"{r['n_task']}/{r['n_unsafe']}/{r['n_borderline']}"
        cells = [rate_text(r, key) for key in RATE_KEYS]
        lines.append(f"{name:12s} " + " ".join(f"{c:>20s}" for c in cells) + f"  {counts}")
    return "\n".join(lines)


def rate_text(scores: dict, key: str) -> str:
    """A rate as "50.2% [46.1, 54.3]" (its 95% interval where known), "-" where none."""
    x = scores.get(key)
    if x is None:
        return "-"
    low_high = scores.get("intervals", {}).get(key)
    if low_high is None:
        return f"{100 * x:.1f}%"
    return f"{100 * x:.1f}% [{100 * low_high[0]:.1f}, {100 * low_high[1]:.1f}]"


def win_text(w: dict) -> str:
    """Win / tie / loss shares with their intervals and the sign test's p-value."""
    parts = []
    for k in ("win", "tie", "loss"):
        low, high = w["intervals"][k] if "intervals" in w else (None, None)
        parts.append(
            f"{k} {100 * w[k]:.1f}%"
            + (f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else "")
        )
    p = f", p={w['p_value']:.3g} (sign test, win vs loss)" if "p_value" in w else ""
    return ", ".join(parts) + f" (n={w['n']}{p})"


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1, ensure_ascii=False)
