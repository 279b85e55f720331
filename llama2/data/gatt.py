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

from ..tokenizer import Tokenizer
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


def sample_dialog(
    answer: Callable[[list[dict]], str], instruction: str, user_turns: Sequence[str]
) -> list[dict]:
    """Build a dialog turn by turn, each answer sampled (by `answer`, e.g. a chat model) with
    the instruction attached to every user turn; returned as the training view: the
    instruction only in the first turn."""
    sampling: list[dict] = []
    answers = []
    for turn in attach(instruction, user_turns):
        sampling.append({"role": "user", "content": turn})
        answers.append(answer(sampling))
        sampling.append({"role": "assistant", "content": answers[-1]})
    dialog = []
    for i, (turn, ans) in enumerate(zip(user_turns, answers, strict=True)):
        content = f"{instruction}\n\n{turn}" if i == 0 else turn
        dialog += [{"role": "user", "content": content}, {"role": "assistant", "content": ans}]
    return dialog


def training_example(tokenizer: Tokenizer, dialog: list[dict]) -> tuple[list[int], list[bool]]:
    """ids and loss mask of a GAtt dialog: only its last answer carries loss (every earlier
    turn, the assistant's included, is zeroed)."""
    return encode_last_answer(tokenizer, dialog)


def adherence_by_turn(
    answer: Callable[[list[dict]], str], instruction: Instruction, user_turns: Sequence[str]
) -> list[bool]:
    """Give the instruction once, in the first turn, and check every answer against it."""
    dialog: list[dict] = []
    honoured = []
    for i, turn in enumerate(user_turns):
        content = f"{instruction.text}\n\n{turn}" if i == 0 else turn
        dialog.append({"role": "user", "content": content})
        reply = answer(dialog)
        honoured.append(instruction.check(reply))
        dialog.append({"role": "assistant", "content": reply})
    return honoured
