"""Rejection sampling fine-tuning (Llama 2, section 3.2.3): K answers per prompt from the
current policy, each scored by the reward model(s); the best per prompt is kept, competing
with the best of all earlier rounds, and the policy is fine-tuned on the winners (SFT, with
the loss on the winning answer only).

The run directory holds config.yaml, samples.jsonl (every answer and its score), best.jsonl
(the winner per prompt, with its score and round), sft.jsonl (the winners as SFT data) and
sft/ (the fine-tuning run, a run directory of its own).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..data.jsonl import parse_prompt, read_jsonl
from ..data.sft import encode_for_training, encode_last_answer
from ..data.split import derive_seed
from ..formats import DialogError
from ..llm import Llama, load
from .config import RejectionConfig, SFTConfig, stage_config
from .loop import pick_device
from .losses import combined_reward
from .reward import pad, scores
from .rundir import latest_checkpoint, open_run, read_jsonl_rows, write_config, write_jsonl
from .sft import sft


def read_prompts(path: str | Path) -> list[dict]:
    """JSONL of {"prompt": text or messages, "is_safety": optional bool}."""
    out = [
        {"prompt": parse_prompt(r, where), "is_safety": bool(r.get("is_safety", False))}
        for where, r in read_jsonl(path)
    ]
    if not out:
        raise DialogError(f"{path}: no prompts")
    return out


@torch.no_grad()
def score_answers(
    rm: Llama, dialogs: list[list[dict]], answers: list[str], batch: int = 16
) -> list[float]:
    """A reward model's raw score (the scalar, a logit) of each answer. Not its sigmoid: in
    float32 that saturates to 1.0 above ~17 and would tie the best answers (section 3.2.3's
    probability is only needed for R_c's 0.15 gate, which applies it itself)."""
    out: list[float] = []
    for i in range(0, len(answers), batch):
        pairs = zip(dialogs[i : i + batch], answers[i : i + batch], strict=True)
        seqs = [
            encode_for_training(rm.tokenizer, [*d, {"role": "assistant", "content": a}])[0]
            for d, a in pairs
        ]
        tokens, lengths = pad(seqs)
        out += scores(rm.model, tokens.to(rm.device), lengths.to(rm.device)).tolist()
    return out


def sample_and_select(cfg: RejectionConfig, out: Path) -> list[dict]:
    """Sample, score and select; returns the best per prompt (also written to best.jsonl)."""
    if not (cfg.init_from and cfg.data and cfg.reward_model):
        raise ValueError("rejection needs init_from=POLICY, data=PROMPTS.jsonl, reward_model=RM")
    prompts = read_prompts(cfg.data)
    device = pick_device(cfg)
    policy = load(cfg.init_from, device=device)
    helpful = load(cfg.reward_model, dtype=torch.float32, device=device)
    safety = (
        load(cfg.safety_model, dtype=torch.float32, device=device) if cfg.safety_model else None
    )
    for rm, name in ((helpful, "reward_model"), (safety, "safety_model")):
        if rm is not None and rm.head != "score":
            raise ValueError(f"{name} {rm.path} is not a reward model")
    K = cfg.samples_per_prompt
    samples = []
    for i, p in enumerate(tqdm(prompts, desc="sampling", unit="prompt")):
        outs = policy.chat(  # K rows of the same dialog, each its own seed
            [p["prompt"]] * K,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=derive_seed(cfg.seed, "samples", i),
        )
        answers = [o.text for o in outs]
        dialogs = [p["prompt"]] * K
        r_help = torch.tensor(score_answers(helpful, dialogs, answers))
        if safety is not None:
            r_safe = torch.tensor(score_answers(safety, dialogs, answers))
            r = combined_reward(r_help, r_safe, torch.tensor([p["is_safety"]] * K))
        else:
            r = r_help
        for k, a in enumerate(answers):
            samples.append({"prompt_index": i, "sample": k, "answer": a, "score": float(r[k])})
    write_jsonl(out / "samples.jsonl", samples)
    previous = {}
    if cfg.previous:
        for row in read_jsonl_rows(Path(cfg.previous)):
            previous[row["prompt_index"]] = row
    this_round = 1 + max((r.get("round", 0) for r in previous.values()), default=-1)
    best = []
    for i, p in enumerate(prompts):
        mine = max((s for s in samples if s["prompt_index"] == i), key=lambda s: s["score"])
        row = {
            "prompt_index": i,
            "prompt": p["prompt"],
            "answer": mine["answer"],
            "score": mine["score"],
            "round": this_round,
        }
        old = previous.get(i)
        if old is not None and old["score"] > mine["score"]:  # an earlier winner still wins
            row |= {"answer": old["answer"], "score": old["score"], "round": old.get("round", 0)}
        best.append(row)
    write_jsonl(out / "best.jsonl", best)
    return best


def rejection(cfg: RejectionConfig, out: str | Path, resume: bool = False) -> list[dict]:
    """Sample and select (once: sampling is seeded, a resumed run reuses best.jsonl), then
    fine-tune on the winners in out/sft."""
    out = Path(out)
    open_run(out, resume, products=("best.jsonl",))
    write_config(out, cfg)
    if not (resume and (out / "best.jsonl").exists()):
        best = sample_and_select(cfg, out)
    else:
        best = read_jsonl_rows(out / "best.jsonl")
    data = [
        {"messages": [*b["prompt"], {"role": "assistant", "content": b["answer"]}]} for b in best
    ]
    write_jsonl(out / "sft.jsonl", data)
    tuned = stage_config(cfg, SFTConfig, data=str(out / "sft.jsonl"))
    # killed before the fine-tuning's first checkpoint: it starts afresh
    resume_sft = resume and latest_checkpoint(out / "sft") is not None
    # the loss on the selected answer only: a multi-turn prompt's history was not selected
    return sft(tuned, out / "sft", resume=resume_sft, encode=encode_last_answer)
