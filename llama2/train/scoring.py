"""Answers scored by the reward models (section 3.2.3): a reward model's raw score of each
answer, and R_c of the helpfulness and safety models together."""

from __future__ import annotations

import math

import torch

from ..data.sft import encode_for_training
from ..llm import Llama, load
from .losses import combined_reward
from .reward import pad, scores


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


def load_reward_model(path: str, name: str, device: torch.device | str = "cpu") -> Llama:
    """A reward model in float32, checked to have a scalar head (`name`: the setting that
    named it, for the error)."""
    rm = load(path, dtype=torch.float32, device=device)
    if rm.head != "score":
        raise ValueError(f"{name} {rm.path} is not a reward model")
    return rm


def load_reward_models(
    reward_model: str, safety_model: str | None, device: torch.device | str = "cpu"
) -> tuple[Llama, Llama | None]:
    """The helpfulness reward model and the safety one (None without it), in float32, each
    checked to have a scalar head."""
    helpful = load_reward_model(reward_model, "reward_model", device)
    safety = load_reward_model(safety_model, "safety_model", device) if safety_model else None
    return helpful, safety


def deemed_unsafe(score: float, floor: float) -> bool:
    """Whether a safety model's raw score gives the answer a probability of being safe below
    `floor` (0: never), compared as logits: a raw score may lie far past exp's range."""
    if floor <= 0:
        return False
    return floor >= 1 or score < math.log(floor / (1 - floor))
