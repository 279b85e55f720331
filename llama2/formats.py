"""Prompt formats: the Llama 2 chat format and Code Llama infilling, as token ids.

Both follow Meta's reference code: each finished chat turn is its own BOS ... EOS sequence,
and the tags are plain text, which is why user content containing them is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
RESERVED_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ANSWER = "Error: special tags are not allowed as part of the prompt."

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class DialogError(ValueError):
    pass


def check_dialog(messages: Sequence[Message]) -> None:
    """A dialog is an optional system message, then user/assistant turns in alternation,
    ending with a user turn. Raise DialogError naming the first message that breaks this."""
    if not messages:
        raise DialogError("the dialog is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DialogError(f"message {i}: expected {{'role': ..., 'content': str}}, got {m!r}")
    start = 1 if messages[0].get("role") == "system" else 0
    for i, m in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.get("role") != expected:
            raise DialogError(f"message {i}: role {m.get('role')!r}, expected {expected!r}")
    if len(messages) == start:
        raise DialogError("the dialog has a system message but no user message")
    if messages[-1]["role"] != "user":
        raise DialogError("the dialog must end with a user message")


def reserved_tags_in(messages: Sequence[Message]) -> list[tuple[int, str]]:
    """(message index, tag) for every reserved tag found inside the dialog's contents."""
    return [(i, t) for i, m in enumerate(messages) for t in RESERVED_TAGS if t in m["content"]]


def chat_segments(
    tokenizer: Tokenizer, messages: Sequence[Message]
) -> list[tuple[list[int], list[int]]]:
    """The dialog as the chat format lays it out, one (prompt ids, answer ids) pair per user
    turn: the prompt is `BOS [INST] user [/INST]`, the answer ` answer ` and EOS (a last user
    turn without an answer gets []). Concatenated, they are the dialog's ids; inference
    (encode_chat) and training (data/sft.py) both build on this, so they cannot disagree.

    Each finished pair is tokenized whole, as the reference does, then split where its prompt
    ends. The dialog is not validated here (see check_dialog)."""
    turns = [dict(m) for m in messages]
    if turns[0]["role"] == "system":
        # the system prompt is merged into the first user turn (before stripping)
        first = turns[1]["content"]
        turns = [{"role": "user", "content": B_SYS + turns[0]["content"] + E_SYS + first}]
        turns += [dict(m) for m in messages[2:]]
    out = []
    for k in range(0, len(turns), 2):
        prompt = f"{B_INST} {turns[k]['content'].strip()} {E_INST}"
        head = tokenizer.encode(prompt, bos=True)
        if k + 1 == len(turns):
            out.append((head, []))
            break
        answer = turns[k + 1]["content"].strip()
        full = tokenizer.encode(f"{prompt} {answer} ", bos=True, eos=True)
        if full[: len(head)] != head:  # (the pieces always split at the space after [/INST])
            raise DialogError(f"turn {k // 2}: the prompt's tokens run into the answer's")
        out.append((head, full[len(head) :]))
    return out


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids of a dialog in the Llama 2 chat format, ready for the assistant's answer.

    Raises DialogError for a malformed dialog or reserved tags inside any content.
    """
    check_dialog(messages)
    found = reserved_tags_in(messages)
    if found:
        i, tag = found[0]
        raise DialogError(f"message {i} contains the reserved tag {tag!r}: {UNSAFE_ANSWER}")
    return [t for prompt, answer in chat_segments(tokenizer, messages) for t in prompt + answer]


INFILL_PIECES = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "eot": "▁<EOT>"}


def infill_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of Code Llama's infilling pieces; a clear error for a vocabulary without them."""
    ids = {name: tokenizer.piece_to_id(piece) for name, piece in INFILL_PIECES.items()}
    missing = [INFILL_PIECES[n] for n, i in ids.items() if i == tokenizer.unk_id]
    if missing:
        raise ValueError(
            f"this tokenizer has no {', '.join(missing)}: infilling needs Code Llama's"
        )
    return ids


def encode_infill(
    tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False
) -> list[int]:
    """Code Llama's infilling prompt. PSM: `bos <PRE> prefix <SUF> suffix <MID>`; SPM
    (suffix_first): `bos <PRE> <SUF> suffix <MID> prefix`. The suffix is encoded without the
    dummy space. Generation stops at <EOT>."""
    t = infill_ids(tokenizer)
    suf = tokenizer.encode(suffix, dummy_prefix=False)
    if suffix_first:
        return [tokenizer.bos_id, t["prefix"], t["suffix"], *suf, t["middle"]] + tokenizer.encode(
            prefix
        )
    pre = tokenizer.encode(prefix)
    return [tokenizer.bos_id, t["prefix"], *pre, t["suffix"], *suf, t["middle"]]
