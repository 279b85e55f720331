"""Ghost Attention (Llama 2, section 3.3): keeping a system-level instruction alive over a
multi-turn dialog.

Sampling: the instruction is attached to every user turn, so that the model's answers follow
it. Training: the same dialog with the instruction kept in the first user turn only, and the
loss zeroed on every earlier turn, so that only the last answer teaches (the model learns to
honour an instruction it saw turns ago). Evaluation: with the instruction in the first turn
only, as users give it, is it still honoured at turn k?
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..formats import DialogError
from ..tokenizer import Tokenizer
from .jsonl import read_jsonl
from .sft import encode_last_answer


@dataclass(frozen=True)
class Instruction:
    text: str
    check: Callable[[str], bool]  # does an answer honour it?


_FRENCH = re.compile(r"\b(le|la|les|est|et|je|vous)\b")


def _ends_with(suffix: str) -> Instruction:
    return Instruction(
        f'Always end your answer with "{suffix}"', lambda a: a.rstrip().endswith(suffix)
    )


def _starts_with(prefix: str) -> Instruction:
    return Instruction(
        f'Always start your answer with "{prefix}"', lambda a: a.lstrip().startswith(prefix)
    )


def _max_words(n: int) -> Instruction:
    return Instruction(f"Answer in at most {n} words", lambda a: len(a.split()) <= n)


def _mention(word: str) -> Instruction:
    return Instruction(
        f'Always mention "{word}" in your answer', lambda a: word.lower() in a.lower()
    )


# Synthetic constraints in the spirit of the paper's (hobbies, language, persona), each with a
# check a program can run.
INSTRUCTIONS: list[Instruction] = [
    _ends_with("Over."),
    _ends_with("Cheers!"),
    _starts_with("Ahoy!"),
    _max_words(10),
    _max_words(20),
    _mention("Python"),
    _mention("llama"),
    Instruction("Only use lowercase letters", lambda a: a == a.lower()),
    Instruction("Never use the letter e", lambda a: "e" not in a.lower()),
    Instruction("Answer in French", lambda a: bool(_FRENCH.search(a.lower()))),
]


def attach(instruction: str, user_turns: Sequence[str]) -> list[str]:
    """The user turns as sampled: the instruction put before each one, exactly where training
    and evaluation put it in the first turn (section 3.3), so that the first turn sampled is
    the first turn trained on."""
    return [f"{instruction}\n\n{turn}" for turn in user_turns]


Answers = Callable[[list[list[dict]], int], list[str]]  # (dialogs, turn index) -> answers


def sample_dialogs(
    answer: Answers, instructions: Sequence[str], user_turns: Sequence[Sequence[str]]
) -> list[list[dict]]:
    """Build many dialogs turn by turn, turn k of every dialog that has one answered in one
    call `answer(dialogs, k)` (a batch for a chat model), each with its instruction attached
    to every user turn; returned as the training view: the instruction only in the first
    turn."""
    sampling: list[list[dict]] = [[] for _ in user_turns]
    answers: list[list[str]] = [[] for _ in user_turns]
    attached = [attach(ins, turns) for ins, turns in zip(instructions, user_turns, strict=True)]
    for k in range(max(map(len, user_turns), default=0)):
        live = [i for i, turns in enumerate(attached) if k < len(turns)]
        for i in live:
            sampling[i].append({"role": "user", "content": attached[i][k]})
        for i, reply in zip(live, answer([sampling[i] for i in live], k), strict=True):
            answers[i].append(reply)
            sampling[i].append({"role": "assistant", "content": reply})
    out = []
    for ins, turns, replies in zip(instructions, user_turns, answers, strict=True):
        dialog = []
        for i, (turn, ans) in enumerate(zip(turns, replies, strict=True)):
            content = f"{ins}\n\n{turn}" if i == 0 else turn
            dialog += [{"role": "user", "content": content}, {"role": "assistant", "content": ans}]
        out.append(dialog)
    return out


def sample_dialog(
    answer: Callable[[list[dict]], str], instruction: str, user_turns: Sequence[str]
) -> list[dict]:
    """One dialog built turn by turn (sample_dialogs with one dialog; `answer(dialog)`)."""
    return sample_dialogs(lambda ds, k: [answer(d) for d in ds], [instruction], [user_turns])[0]


def training_example(tokenizer: Tokenizer, dialog: list[dict]) -> tuple[list[int], list[bool]]:
    """ids and loss mask of a GAtt dialog: only its last answer carries loss (every earlier
    turn, the assistant's included, is zeroed)."""
    return encode_last_answer(tokenizer, dialog)


def adherence_by_turns(
    answer: Answers, instructions: Sequence[Instruction], user_turns: Sequence[Sequence[str]]
) -> list[list[bool]]:
    """Give each dialog's instruction once, in its first turn, and check every answer
    against it; turn k of every dialog answered in one call `answer(dialogs, k)`."""
    dialogs: list[list[dict]] = [[] for _ in user_turns]
    honoured: list[list[bool]] = [[] for _ in user_turns]
    for k in range(max(map(len, user_turns), default=0)):
        live = [i for i, turns in enumerate(user_turns) if k < len(turns)]
        for i in live:
            turn = user_turns[i][k]
            content = f"{instructions[i].text}\n\n{turn}" if k == 0 else turn
            dialogs[i].append({"role": "user", "content": content})
        for i, reply in zip(live, answer([dialogs[i] for i in live], k), strict=True):
            honoured[i].append(instructions[i].check(reply))
            dialogs[i].append({"role": "assistant", "content": reply})
    return honoured


def adherence_by_turn(
    answer: Callable[[list[dict]], str], instruction: Instruction, user_turns: Sequence[str]
) -> list[bool]:
    """Give the instruction once, in the first turn, and check every answer against it."""
    batch = adherence_by_turns(lambda ds, k: [answer(d) for d in ds], [instruction], [user_turns])
    return batch[0]


def read_turns(path: str | Path) -> list[dict]:
    """GAtt dialogs (JSONL): {"turns": [user texts], "instruction": optional, one of
    INSTRUCTIONS' texts, "is_safety": optional, a true/false per turn (a safety prompt, as in
    prompt files; default all false)}."""
    out = []
    for where, r in read_jsonl(path):
        turns = r.get("turns") if isinstance(r, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DialogError(f"{where}: field 'turns' must be a non-empty list of texts")
        text = r.get("instruction")
        if text is not None and text not in {i.text for i in INSTRUCTIONS}:
            raise DialogError(f"{where}: unknown instruction {text!r}")
        flags = r.get("is_safety", [False] * len(turns))
        if not (
            isinstance(flags, list)
            and len(flags) == len(turns)
            and all(isinstance(f, bool) for f in flags)
        ):
            raise DialogError(f"{where}: field 'is_safety' must be a true/false per turn")
        out.append({"turns": turns, "instruction": text, "is_safety": flags})
    if not out:
        raise DialogError(f"{path}: no dialogs")
    return out
