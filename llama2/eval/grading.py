"""A policy's answers to prompts that carry a `check`, graded (llama2.eval.judges.grade or a
grader of the same signature), and the held-out numbers the sampling stages log: the mean
reward and the mean of each graded number of the policy's greedy answers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..llm import Llama

Grade = Callable[[dict, str], dict[str, float]]  # llama2.eval.judges.grade's signature
# the reward of each answer to each prompt (prompts as data.jsonl.read_prompts gives them)
Reward = Callable[[list[dict], list[str]], torch.Tensor]


def grader(prompts: list[dict], grade: Grade | None = None) -> Grade | None:
    """`grade`, or llama2.eval.judges.grade when some prompt carries a check; resolved before
    any sampling, so that a missing grader fails at once."""
    if grade is None and any("check" in p for p in prompts):
        from .judges import grade
    return grade


def graded_means(prompts: list[dict], answers: list[str], grade: Grade | None = None) -> dict:
    """The mean of each number `grade(check, answer)` gives, over the answers to prompts that
    carry a check (a key counts only the answers it was given for); {} if none has one."""
    checked = [(p["check"], a) for p, a in zip(prompts, answers, strict=True) if "check" in p]
    if not checked:
        return {}
    grade = grader(prompts, grade)
    values: dict[str, list[float]] = {}
    for check, answer in checked:
        for key, v in grade(check, answer).items():
            values.setdefault(key, []).append(float(v))
    return {key: sum(v) / len(v) for key, v in values.items()}


def greedy_answers(policy: Llama, prompts: list[dict], max_new_tokens: int, rows: int) -> list[str]:
    """The policy's greedy answer to each prompt, `rows` prompts per generation batch."""
    out: list[str] = []
    for i in range(0, len(prompts), rows):
        dialogs = [p["prompt"] for p in prompts[i : i + rows]]
        outs = policy.chat(dialogs, temperature=0, max_new_tokens=max_new_tokens)
        out += [o.text for o in outs]
    return out


def held_out_quality(
    policy: Llama,
    prompts: list[dict],
    max_new_tokens: int,
    reward: Reward,
    rows: int = 64,
    grade: Grade | None = None,
) -> dict[str, float]:
    """held_out_reward (the mean of `reward`) and held_out_<key> (each graded number's mean)
    of the policy's greedy answers to the held-out prompts: the same answers for both, so that
    a reward rising while the task quality falls (reward hacking) shows."""
    if not prompts:
        return {}
    answers = greedy_answers(policy, prompts, max_new_tokens, rows)
    out = {"held_out_reward": float(reward(prompts, answers).mean())}
    return out | {f"held_out_{k}": v for k, v in graded_means(prompts, answers, grade).items()}
