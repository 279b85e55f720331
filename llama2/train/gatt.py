"""`llama2 gatt`: Ghost Attention (Llama 2, section 3.3) end to end. For each dialog of user
turns, an instruction (one of data/gatt.py's, drawn from the seed) is attached to every user
turn to sample the answers with the current chat model; the dialogs are then fine-tuned on
with the instruction in the first turn only and the loss on the last answer only. Finally
the tuned model's adherence is measured turn by turn, the instruction given once.

`data`: JSONL of {"turns": ["...", "...", ...]} (optional "instruction": one of the texts).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm import tqdm

from ..data.gatt import INSTRUCTIONS, adherence_by_turn, sample_dialog, training_example
from ..data.jsonl import read_jsonl
from ..data.split import derive_seed
from ..formats import DialogError
from ..io import write_atomic
from ..llm import load
from .config import GattConfig, SFTConfig, stage_config
from .loop import pick_device
from .rundir import latest_checkpoint, open_run, write_config, write_jsonl
from .sft import sft


def read_turns(path: str | Path) -> list[dict]:
    out = []
    for where, r in read_jsonl(path):
        turns = r.get("turns") if isinstance(r, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DialogError(f"{where}: field 'turns' must be a non-empty list of texts")
        text = r.get("instruction")
        if text is not None and text not in {i.text for i in INSTRUCTIONS}:
            raise DialogError(f"{where}: unknown instruction {text!r}")
        out.append({"turns": turns, "instruction": text})
    if not out:
        raise DialogError(f"{path}: no dialogs")
    return out


def gatt(cfg: GattConfig, out: str | Path, resume: bool = False) -> dict:
    if not cfg.init_from or not cfg.data:
        raise ValueError("gatt needs init_from=CHAT_MODEL and data=DIALOGS.jsonl")
    out = Path(out)
    open_run(out, resume, products=("gatt.jsonl",))
    write_config(out, cfg)
    records = read_turns(cfg.data)
    rng = random.Random(derive_seed(cfg.seed, "instructions"))
    by_text = {i.text: i for i in INSTRUCTIONS}
    chosen = [
        by_text[r["instruction"]] if r["instruction"] else rng.choice(INSTRUCTIONS) for r in records
    ]
    data = out / "gatt.jsonl"
    if not (resume and data.exists()):
        chat = load(cfg.init_from, device=pick_device(cfg))
        rows = []
        for n, (r, ins) in enumerate(
            zip(tqdm(records, desc="sampling dialogs", unit="dialog"), chosen, strict=True)
        ):

            def answer(dialog, n=n):  # a seed per dialog and turn
                seed = derive_seed(cfg.seed, "answers", n, len(dialog))
                return chat.chat(
                    dialog,
                    temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens,
                    seed=seed,
                ).text

            rows.append({"messages": sample_dialog(answer, ins.text, r["turns"])})
        write_jsonl(data, rows)
    tuned_cfg = stage_config(cfg, SFTConfig, data=str(data))
    resume_sft = resume and latest_checkpoint(out / "sft") is not None
    sft(tuned_cfg, out / "sft", resume_sft, encode=training_example)
    tuned = load(out / "sft" / "model", device=pick_device(cfg))

    def greedy(dialog):
        return tuned.chat(dialog, temperature=0, max_new_tokens=cfg.max_new_tokens).text

    turns = max(len(r["turns"]) for r in records)
    honoured = [[] for _ in range(turns)]
    for r, ins in zip(records, chosen, strict=True):
        for k, ok in enumerate(adherence_by_turn(greedy, ins, r["turns"])):
            honoured[k].append(ok)
    report = {
        "adherence_by_turn": [sum(h) / len(h) for h in honoured if h],
        "dialogs": len(records),
    }
    write_atomic(out / "adherence.json", json.dumps(report, indent=2))
    return report
