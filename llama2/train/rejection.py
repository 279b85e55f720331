"""Rejection sampling fine-tuning (Llama 2, section 3.2.3): K answers per prompt from the
current policy, each scored by the reward model(s); the best per prompt is kept, competing
with the best of all earlier rounds, and the policy is fine-tuned on the winners (SFT, with
the loss on the winning answer only).

The run directory holds config.yaml, samples.jsonl (every answer and its score), best.jsonl
(the winner per prompt, with its score and round), sft.jsonl (the winners as SFT data) and
sft/ (the fine-tuning run, a run directory of its own).
"""

from __future__ import annotations

import hashlib
import json
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


def prompt_key(prompt: list[dict]) -> str:
    """A prompt's identity across rounds: a hash of its messages."""
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_previous(path: Path) -> dict[str, dict]:
    """An earlier round's best.jsonl, by prompt_key of each row's prompt."""
    out = {}
    for n, row in enumerate(read_jsonl_rows(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), list):
            raise DialogError(f"{path}:{n}: field 'prompt' must be a list of messages")
        if not isinstance(row.get("answer"), str):
            raise DialogError(f"{path}:{n}: field 'answer' must be text")
        out[prompt_key(row["prompt"])] = row
    return out


def score(
    helpful: Llama, safety: Llama | None, prompts: list[dict], answers: list[str]
) -> torch.Tensor:
    """Each answer's raw score: R_c with a safety model (section 3.2.3), else helpfulness."""
    if not answers:
        return torch.zeros(0)
    dialogs = [p["prompt"] for p in prompts]
    r_help = torch.tensor(score_answers(helpful, dialogs, answers))
    if safety is None:
        return r_help
    r_safe = torch.tensor(score_answers(safety, dialogs, answers))
    return combined_reward(r_help, r_safe, torch.tensor([p["is_safety"] for p in prompts]))


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
        r = score(helpful, safety, [p] * K, answers)
        for k, a in enumerate(answers):
            samples.append({"prompt_index": i, "sample": k, "answer": a, "score": float(r[k])})
    write_jsonl(out / "samples.jsonl", samples)
    previous = read_previous(Path(cfg.previous)) if cfg.previous else {}
    this_round = 1 + max((r.get("round", 0) for r in previous.values()), default=-1)
    # an earlier round's winner competes again, matched by its prompt (a prompt file may be
    # reordered or edited between rounds) and rescored by today's reward model(s): the
    # paper's reward models change between rounds, so its stored score is stale
    olds = [(p, previous.get(prompt_key(p["prompt"]))) for p in prompts]
    matched = [(p, old) for p, old in olds if old is not None]
    rescored = iter(
        score(helpful, safety, [p for p, _ in matched], [o["answer"] for _, o in matched]).tolist()
    )
    best = []
    for i, (p, old) in enumerate(olds):
        mine = max((s for s in samples if s["prompt_index"] == i), key=lambda s: s["score"])
        row = {
            "prompt_index": i,
            "prompt": p["prompt"],
            "answer": mine["answer"],
            "score": mine["score"],
            "round": this_round,
        }
        if old is not None:
            old_score = next(rescored)
            if old_score > mine["score"]:  # an earlier winner still wins
                row |= {"answer": old["answer"], "score": old_score, "round": old.get("round", 0)}
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
