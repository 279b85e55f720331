"""`llama2 gatt`: Ghost Attention (Llama 2, section 3.3) end to end. For each dialog of user
turns, an instruction (one of data/gatt.py's, drawn from the seed) is attached to every user
turn to sample the answers with the current chat model; the dialogs are then fine-tuned on
with the instruction in the first turn only and the loss on the last answer only (`epochs`
sets the fine-tuning's steps, as in sft). Finally the tuned model's adherence is measured
turn by turn, the instruction given once.

Sampling and evaluation are batched across dialogs: turn 1 of every dialog in one chat
call (`sample_rows` dialogs a batch), then turn 2, and so on. Batch b of turn k is seeded
with derive_seed(seed, "answers", k, b), its row j drawing from that seed + j.

`data`: JSONL of {"turns": ["...", "...", ...]} (optional "instruction": one of the texts).
`samples_per_turn` > 1 makes each answer the best of that many draws by the reward models
(best_of_chat), as rejection sampling chooses.
`keep_adherent` makes an example of each sampled answer that honours the instruction (its
dialog up to it), and with a `safety_model` leaves out answers to turns flagged is_safety
that the model deems unsafe;
`replay` adds chat examples (the SFT data) to the fine-tuning, so that the model does not
unlearn what they taught. The run directory holds config.yaml, gatt.jsonl (the sampled
dialogs), train.jsonl (what is fine-tuned on), sft/ (the fine-tuning run), model -> sft/model
and adherence.json.

Under `torchrun` each turn's batches are dealt out to the ranks (batch b to rank b % N,
with the seed one process gives it) and gathered in order, so the dialogs do not depend on
N; the main process writes the files, and the fine-tuning runs on every rank (FSDP2).
"""

from __future__ import annotations

import dataclasses
import json
import random
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from ..data.gatt import (
    INSTRUCTIONS,
    Instruction,
    adherence_by_turns,
    read_turns,
    sample_dialogs,
    training_example,
)
from ..data.jsonl import write_jsonl
from ..data.sft import read_sft_jsonl
from ..data.split import derive_seed
from ..device import pick_device
from ..io import write_atomic
from ..llm import Llama, load
from .config import GattConfig, SFTConfig, stage_config
from .loop import Dist, map_shards, setup_distributed
from .rundir import check_run, latest_checkpoint, link_model, new_run, write_config
from .scoring import deemed_unsafe, load_reward_model, load_reward_models, score, score_answers
from .sft import sft


def batched_chat(
    chat: Llama,
    cfg: GattConfig,
    temperature: float,
    seeded: bool,
    d: Dist | None = None,
    draw: int = 0,
):
    """An `answer(dialogs, k)` for data/gatt.py: the dialogs' next answers, `sample_rows`
    dialogs per chat call; seeded per turn k and batch (see the module's docstring; a later
    `draw` of the same turn from a stream of its own); the batches shared by the processes `d`
    (every one gets all the answers)."""
    d = d or Dist()

    def answer(dialogs: list[list[dict]], k: int) -> list[str]:
        def run(b: int, chunk: list[list[dict]]) -> list[str]:
            index = (k, b, draw) if draw else (k, b)
            seed = derive_seed(cfg.seed, "answers", *index) if seeded else None
            outs = chat.chat(
                chunk, temperature=temperature, max_new_tokens=cfg.max_new_tokens, seed=seed
            )
            return [o.text for o in outs]

        return map_shards(run, dialogs, cfg.sample_rows, d)

    return answer


def best_of_chat(
    chat: Llama,
    cfg: GattConfig,
    d: Dist,
    instructions: list[Instruction],
    flags: list[list[bool]],
    helpful: Llama,
    safety: Llama | None,
):
    """An `answer(dialogs, k)` whose answer to each dialog is the best of
    `cfg.samples_per_turn` draws (`choose`), scored as rejection sampling scores (R_c, with
    turn k's is_safety flag). `instructions`, `flags`: every dialog's, in the order
    sample_dialogs numbers them; turn k's call holds those with a turn k, in that order."""
    draws = [
        batched_chat(chat, cfg, cfg.temperature, seeded=True, d=d, draw=j)
        for j in range(cfg.samples_per_turn)
    ]

    def answer(dialogs: list[list[dict]], k: int) -> list[str]:
        live = [i for i, f in enumerate(flags) if k < len(f)]
        rows = [list(r) for r in zip(*(sample(dialogs, k) for sample in draws), strict=True)]
        n = cfg.samples_per_turn
        prompts = [
            {"prompt": dialog, "is_safety": flags[i][k]}
            for i, dialog in zip(live, dialogs, strict=True)
            for _ in range(n)
        ]
        rewards = score(helpful, safety, prompts, [a for row in rows for a in row]).tolist()
        honours = [
            [instructions[i].check(a) for a in row] for i, row in zip(live, rows, strict=True)
        ]
        return choose(rows, honours, [rewards[j * n : (j + 1) * n] for j in range(len(rows))])

    return answer


def choose(
    draws: list[list[str]], honours: list[list[bool]], rewards: list[list[float]]
) -> list[str]:
    """Per dialog, the draw that honours its instruction with the highest reward; with none
    honouring it, the highest reward; ties to the earlier draw."""
    return [
        row[max(range(len(row)), key=lambda j: (h[j], r[j]))]
        for row, h, r in zip(draws, honours, rewards, strict=True)
    ]


def adherent_prefixes(dialog: list[dict], instruction: Instruction) -> list[list[dict]]:
    """The dialog up to each of its answers that honours the instruction: the loss is on the
    last answer, so each prefix teaches one honoured answer at its own turn, after whatever
    came before (an earlier broken answer included: the instruction still holds after it),
    so that every turn position gets its share (a small model's dialogs, kept only up to
    their first broken answer, would teach turns 1 and 2 almost alone)."""
    return [
        dialog[: k + 1]
        for k, m in enumerate(dialog)
        if m["role"] == "assistant" and instruction.check(m["content"])
    ]


def unsafe_answers(
    cfg: GattConfig, prefixes: list[list[dict]], flags: list[list[bool]]
) -> list[bool]:
    """For each prefix (a dialog up to an answer): whether it answers a safety turn (its
    dialog's is_safety flag for that turn) and the safety model deems the answer unsafe.
    Honouring the instruction is not being safe: a sampled answer that complies with an unsafe
    request may honour it too, and fine-tuned on, it teaches the compliance."""
    out = [False] * len(prefixes)
    asked = [k for k, (p, f) in enumerate(zip(prefixes, flags, strict=True)) if f[len(p) // 2 - 1]]
    if not (cfg.safety_model and cfg.safety_floor > 0 and asked):
        return out
    safety = load_reward_model(cfg.safety_model, "safety_model", pick_device(cfg.device))
    scores = score_answers(
        safety, [prefixes[k][:-1] for k in asked], [prefixes[k][-1]["content"] for k in asked]
    )
    for k, s in zip(asked, scores, strict=True):
        out[k] = deemed_unsafe(s, cfg.safety_floor)
    return out


def training_rows(
    cfg: GattConfig,
    dialogs: list[list[dict]],
    instructions: list[Instruction],
    flags: list[list[bool]] | None = None,
) -> list[dict]:
    """The fine-tuning's examples: the sampled dialogs (with keep_adherent, one example per
    answer that honours the instruction, less those to safety turns that the safety model
    deems unsafe) and the replayed chat examples. `flags`: each dialog's is_safety per turn."""
    if cfg.keep_adherent:
        flags = flags or [[False] * (len(d) // 2) for d in dialogs]
        kept, kept_flags = [], []
        for d, i, f in zip(dialogs, instructions, flags, strict=True):
            prefixes = adherent_prefixes(d, i)
            kept += prefixes
            kept_flags += [f] * len(prefixes)
        answers = sum(len(d) // 2 for d in dialogs)
        print(
            f"{len(kept)} of the {answers} sampled answers of {len(dialogs)} dialogs honour "
            "their instruction; each is an example, its dialog up to it"
        )
        unsafe = unsafe_answers(cfg, kept, kept_flags)
        if any(unsafe):
            print(
                f"{sum(unsafe)} of them left out: answers to safety turns the safety model "
                f"deems unsafe (p < {cfg.safety_floor})"
            )
            kept = [p for p, bad in zip(kept, unsafe, strict=True) if not bad]
        if not kept:
            raise ValueError("no sampled answer honours its instruction: nothing to train on")
        dialogs = kept
    rows = [{"messages": d} for d in dialogs]
    if cfg.replay:
        replay = read_sft_jsonl(cfg.replay)
        if cfg.replay_rows:
            rng = random.Random(derive_seed(cfg.seed, "replay"))
            replay = rng.sample(replay, min(cfg.replay_rows, len(replay)))
        rows += [{"messages": d} for d in replay]
    return rows


def gatt(cfg: GattConfig, out: str | Path, resume: bool = False) -> dict:
    if not cfg.init_from or not cfg.data:
        raise ValueError("gatt needs init_from=CHAT_MODEL and data=DIALOGS.jsonl")
    out = Path(out)
    device = pick_device(cfg.device)
    check_run(out, resume, products=("gatt.jsonl",))
    d = setup_distributed(device)
    records = read_turns(cfg.data)
    # checked now, not after the sampling (training_rows reads them then)
    if cfg.replay:
        read_sft_jsonl(cfg.replay)
    if cfg.samples_per_turn > 1:  # (checks the safety model too)
        helpful, safety = load_reward_models(cfg.reward_model, cfg.safety_model, device)
    elif cfg.safety_model and cfg.safety_floor > 0:
        load_reward_model(cfg.safety_model, "safety_model")
    rng = random.Random(derive_seed(cfg.seed, "instructions"))
    by_text = {i.text: i for i in INSTRUCTIONS}
    chosen = [
        by_text[r["instruction"]] if r["instruction"] else rng.choice(INSTRUCTIONS) for r in records
    ]
    turns = [r["turns"] for r in records]
    flags = [r["is_safety"] for r in records]
    data = out / "gatt.jsonl"
    if not (resume and data.exists()):
        # a failure before the dialogs are written (the model, the sampling) leaves no run
        with new_run(out) if d.main else nullcontext():
            chat = load(cfg.init_from, device=device)
            if d.main:
                out.mkdir(parents=True, exist_ok=True)
                write_config(out, cfg)
            bar = tqdm(
                total=max(map(len, turns)), desc="sampling turns", unit="turn", disable=not d.main
            )
            if cfg.samples_per_turn > 1:
                sampler = best_of_chat(chat, cfg, d, chosen, flags, helpful, safety)
            else:
                sampler = batched_chat(chat, cfg, cfg.temperature, seeded=True, d=d)

            def answer(dialogs, k):
                replies = sampler(dialogs, k)
                bar.update()
                return replies

            with bar:
                dialogs = sample_dialogs(answer, [ins.text for ins in chosen], turns)
            if d.main:
                write_jsonl(data, [{"messages": dialog} for dialog in dialogs])
            d.barrier()
    elif d.main:
        write_config(out, cfg)
    train_data = out / "train.jsonl"
    if d.main and not (resume and train_data.exists()):
        write_jsonl(train_data, training_rows(cfg, read_sft_jsonl(data), chosen, flags))
    d.barrier()
    tuned_cfg = stage_config(cfg, SFTConfig, data=str(train_data))
    resume_sft = resume and latest_checkpoint(out / "sft") is not None
    rows = sft(tuned_cfg, out / "sft", resume_sft, encode=training_example)
    if d.main:
        if rows:  # the fine-tuning's steps as run (set by epochs, when given), for the record
            write_config(out, dataclasses.replace(cfg, steps=max(r["step"] for r in rows)))
        link_model(out)
    d.barrier()
    tuned = load(out / "model", device=device)
    greedy = batched_chat(tuned, cfg, 0.0, seeded=False, d=d)
    honoured = adherence_by_turns(greedy, chosen, turns)
    by_turn = [[h[k] for h in honoured if k < len(h)] for k in range(max(map(len, turns)))]
    report = {
        "adherence_by_turn": [sum(h) / len(h) for h in by_turn if h],
        "dialogs": len(records),
    }
    if d.main:
        write_atomic(out / "adherence.json", json.dumps(report, indent=2))
    return report
