"""Preference pairs (JSONL): `prompt` (text or a message list), `chosen`, `rejected`, and a
`rating` (significantly_better, better, slightly_better, negligibly_better) or a numeric
`margin`; optional `is_safety` (JSON true/false). Validated up front, errors as file:line: field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..formats import DialogError, reserved_tags_in
from .jsonl import parse_prompt, read_flag, read_jsonl

# the annotators' ratings of how much better the chosen answer is (Llama 2, section 3.2.2)
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")


@dataclass
class Preference:
    prompt: list[dict]  # the dialog up to (and including) the last user turn
    chosen: str
    rejected: str
    rating: str | None
    margin: float | None
    is_safety: bool


def read_preferences(paths: str | Path) -> list[Preference]:
    """Pairs from one file, or several separated by commas (a data mix, e.g. the helpfulness
    model's: helpful.jsonl,some_safety.jsonl)."""
    out = []
    for path in str(paths).split(","):
        out += _read_one(Path(path))
    return out


def _read_one(path: Path) -> list[Preference]:
    out = []
    for where, r in read_jsonl(path):
        prompt = parse_prompt(r, where)
        for field in ("chosen", "rejected"):
            if not isinstance(r.get(field), str):
                raise DialogError(f"{where}: field '{field}' must be text")
        rating, margin = r.get("rating"), r.get("margin")
        if rating is not None and rating not in RATINGS:
            raise DialogError(f"{where}: field 'rating' must be one of {', '.join(RATINGS)}")
        if margin is not None and (
            isinstance(margin, bool) or not isinstance(margin, int | float) or abs(margin) > 1e6
        ):  # (1e999 reads as inf: a NaN loss, and a NaN model saved)
            raise DialogError(f"{where}: field 'margin' must be a number of at most 1e6")
        messages = [*prompt, {"role": "assistant", "content": r["chosen"] + r["rejected"]}]
        if reserved_tags_in(messages):
            raise DialogError(f"{where}: a reserved chat tag appears in the text")
        is_safety = read_flag(r, "is_safety", where)
        out.append(Preference(prompt, r["chosen"], r["rejected"], rating, margin, is_safety))
    if not out:
        raise DialogError(f"{path}: no preference pairs")
    return out
