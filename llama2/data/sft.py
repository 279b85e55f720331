"""Supervised fine-tuning data: dialogs in the Llama 2 chat format, the loss on answers only,
several examples packed into each row (paper, section 3.1).

Accepted JSONL records, one per line: Alpaca (`instruction`, optional `input`, `output`),
OpenAI `messages` (`role`, `content`), ShareGPT `conversations` (`from`, `value`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..formats import DialogError, chat_segments, check_dialog, reserved_tags_in
from ..tokenizer import Tokenizer
from .jsonl import read_jsonl

IGNORE = -100  # label of tokens that carry no loss
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def record_to_messages(record: dict, where: str) -> list[dict]:
    """One JSONL record (any accepted schema) as a dialog ending with an assistant answer."""
    if not isinstance(record, dict):
        raise DialogError(f"{where}: expected a JSON object")
    if "instruction" in record:
        for field in ("instruction", "output"):
            if not isinstance(record.get(field), str):
                raise DialogError(f"{where}: field '{field}' must be text")
        prompt = record["instruction"]
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise DialogError(f"{where}: field 'input' must be text")
        if record.get("input"):
            prompt += "\n\n" + record["input"]
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": record["output"]},
        ]
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise DialogError(f"{where}: field 'messages' must be a list of messages")
    elif "conversations" in record:
        if not isinstance(record["conversations"], list):
            raise DialogError(f"{where}: field 'conversations' must be a list of turns")
        messages = []
        for i, turn in enumerate(record["conversations"]):
            role = _SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None:
                raise DialogError(
                    f"{where}: conversations[{i}].from must be one of {sorted(_SHAREGPT_ROLES)}"
                )
            messages.append({"role": role, "content": turn.get("value")})
    else:
        raise DialogError(f"{where}: no 'instruction', 'messages' or 'conversations' field")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        raise DialogError(f"{where}: the dialog is empty")
    if messages[-1].get("role") != "assistant":
        raise DialogError(f"{where}: the dialog must end with an assistant answer")
    try:
        check_dialog(messages[:-1])
    except DialogError as e:
        raise DialogError(f"{where}: {e}") from e
    if not isinstance(messages[-1].get("content"), str):
        raise DialogError(f"{where}: message {len(messages) - 1}: content must be text")
    found = reserved_tags_in(messages)
    if found:
        raise DialogError(
            f"{where}: message {found[0][0]} contains the reserved tag {found[0][1]!r}"
        )
    return messages


def read_sft_jsonl(path: str | Path) -> list[list[dict]]:
    dialogs = [record_to_messages(record, where) for where, record in read_jsonl(path)]
    if not dialogs:
        raise DialogError(f"{path}: no examples")
    return dialogs


def encode_for_training(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a finished dialog in the chat format, and which carry loss: exactly the
    assistant answers (each with its EOS); system, user turns and tags carry none."""
    ids: list[int] = []
    loss: list[bool] = []
    for prompt, answer in chat_segments(tokenizer, messages):
        ids += prompt + answer
        loss += [False] * len(prompt) + [True] * len(answer)
    return ids, loss


def encode_last_answer(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """As encode_for_training, with loss on the last answer only: the earlier turns are the
    prompt's history, not answers chosen by this example (rejection sampling's winner,
    section 3.2.3; Ghost Attention's last turn, section 3.3)."""
    ids: list[int] = []
    loss: list[bool] = []
    segments = chat_segments(tokenizer, messages)
    for k, (prompt, answer) in enumerate(segments):
        ids += prompt + answer
        loss += [False] * len(prompt) + [k == len(segments) - 1] * len(answer)
    return ids, loss


def pack(
    examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy packing of (ids, loss mask) examples into rows of seq_len + 1 tokens.
    Returns inputs and targets [N, seq_len] (IGNORE where no loss) and segment ids (0 =
    padding). An example longer than a row is left out (cut, it would lose its answer's end),
    with a warning; none fitting is an error."""
    fits = [(ids, mask) for ids, mask in examples if len(ids) <= seq_len + 1]
    if len(fits) < len(examples):
        warnings.warn(
            f"{len(examples) - len(fits)} of {len(examples)} examples are longer than "
            f"seq_len + 1 = {seq_len + 1} tokens and are left out",
            stacklevel=2,
        )
    if not fits:
        raise ValueError(f"no example fits in seq_len {seq_len}: raise seq_len")
    rows: list[list[tuple[list[int], list[bool]]]] = [[]]
    used = 0
    for ids, mask in fits:
        if used + len(ids) > seq_len + 1 and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += len(ids)
    n = len(rows)
    tokens = torch.full((n, seq_len + 1), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len + 1), IGNORE, dtype=torch.long)
    segments = torch.zeros(n, seq_len + 1, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for s, (ids, mask) in enumerate(row, 1):
            end = pos + len(ids)
            tokens[r, pos:end] = torch.tensor(ids)
            labels[r, pos:end] = torch.where(torch.tensor(mask), torch.tensor(ids), IGNORE)
            segments[r, pos:end] = s
            pos = end
    # a token predicts the next one of its own example: no target across a boundary
    targets = labels[:, 1:].clone()
    targets[segments[:, 1:] != segments[:, :-1]] = IGNORE
    return tokens[:, :-1], targets, segments[:, :-1]
