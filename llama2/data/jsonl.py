"""JSON Lines: the strict reader of input files (every error names its file and line), and
the writer and reader of the rows this package writes itself (metrics, samples, data sets)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..formats import DialogError, check_dialog
from ..io import parse_json, read_text, write_atomic


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object a line, the file written atomically."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file this package wrote; a last line without its newline (cut by a
    kill or a full disk mid-write) is not a row."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # (the piece after the last newline)
    return [json.loads(line) for line in lines if line.strip()]


def read_jsonl(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-empty line; `where` is "file:line" for error messages.
    Only "\\n" ends a line (U+2028 and friends may stand raw inside JSON strings)."""
    path = Path(path)
    text = read_text(path, error=DialogError)
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = parse_json(line)
        except json.JSONDecodeError as e:
            raise DialogError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from e
        except RecursionError as e:
            raise DialogError(f"{path}:{n}: invalid JSON: nested too deeply") from e
        except ValueError as e:  # NaN, Infinity: name the field that holds it
            field = _non_finite(json.loads(line))
            raise DialogError(f"{path}:{n}: field '{field}': {e}") from e
        yield f"{path}:{n}", record


def parse_prompt(record: object, where: str) -> list[dict]:
    """A record's `prompt`: text (one user turn) or a message list ending with a user turn."""
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise DialogError(f"{where}: field 'prompt' must be text or a list of messages")
    try:
        check_dialog(prompt)
    except DialogError as e:
        raise DialogError(f"{where}: prompt: {e}") from e
    return prompt


def read_flag(record: dict, field: str, where: str) -> bool:
    """An optional JSON true/false field (absent or null: false). Anything else is an error:
    bool() of the text "no" or "false" would be True, flipping a safety prompt silently."""
    value = record.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise DialogError(f"{where}: field '{field}' must be true or false, not {value!r}")
    return value


def read_prompts(path: str | Path) -> list[dict]:
    """JSONL of {"prompt": text or messages, "is_safety": optional true/false, "check":
    optional JSON object}. `check` is opaque here: what a grader (llama2.eval.judges) needs
    to judge an answer to the prompt (its task's expected answer, whether it is unsafe...)."""
    out = []
    for where, r in read_jsonl(path):
        row = {"prompt": parse_prompt(r, where), "is_safety": read_flag(r, "is_safety", where)}
        check = r.get("check")
        if check is not None:
            if not isinstance(check, dict):
                raise DialogError(f"{where}: field 'check' must be a JSON object")
            row["check"] = check
        out.append(row)
    if not out:
        raise DialogError(f"{path}: no prompts")
    return out


def _non_finite(value, where: str = "") -> str | None:
    """The path (a.b[2]) of the first NaN or infinity in a parsed JSON value."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(the record)"
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, v in items:
        found = _non_finite(
            v, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip(".")
        )
        if found:
            return found
    return None
