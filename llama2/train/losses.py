"""The objectives of Llama 2's alignment (paper, section 3) and DPO, as plain functions.

Every function takes per-example (or per-token) tensors and returns a scalar mean unless
its docstring says otherwise, so that each can be checked against numbers worked by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.preferences import RATINGS

# Section 3.2.2, table 27: the margin m(r) added to the ranking loss for each rating.
MARGINS = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0), strict=True)),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0), strict=True)),
}


def ranking_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Binary ranking loss with margin (eq. 2): -log sigmoid(r_chosen - r_rejected - m)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al. 2023) on sequence log-probabilities:
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * logits).mean()


def per_token_kl(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """The sampled-token estimate of KL(policy || reference) per token: log pi - log pi_ref
    (Schulman's k1). Unbiased, but any one token's (and a short answer's sum) can be negative.
    It is the penalty of the reward, as in the paper (section 3.2.3, after Stiennon et al. 2020
    and Ouyang et al. 2022: -beta * log(pi / pi_0) per token)."""
    return logp_policy - logp_ref


def per_token_kl_k3(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per sampled token:
    exp(r) - r - 1 with r = log pi_ref - log pi. Unbiased like k1, and never negative
    (e^r >= 1 + r), with a lower variance: the KL that is logged."""
    r = logp_ref - logp_policy
    return torch.exp(r) - r - 1


def combined_reward(
    r_helpful: torch.Tensor,
    r_safety: torch.Tensor,
    is_safety: torch.Tensor,
    threshold: float = 0.15,
) -> torch.Tensor:
    """R_c (section 3.2.3): the safety score for safety prompts, or whenever it falls below
    `threshold`; the helpfulness score otherwise. Scores are the reward models' raw outputs
    (logits): the gate compares sigmoid(r_safety) with `threshold`, and the raw score is passed
    on, since a sigmoid saturates to 1.0 in float32 and ties every score above ~17."""
    use_safety = is_safety.bool() | (torch.sigmoid(r_safety.float()) < threshold)
    return torch.where(use_safety, r_safety, r_helpful)


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance (population variance)."""
    return (x - x.mean()) * torch.rsqrt(x.var(unbiased=False) + eps)


def whiten_scores(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The scores whitened over the batch (section 3.2.3), unless the batch holds fewer than
    two distinct scores (one prompt, or all R_c equal): whitening would then zero every score
    and leave only the KL term to optimise, so the raw logits are passed on unchanged."""
    if scores.numel() < 2 or scores.std(unbiased=False) < eps:
        return scores
    return whiten(scores)


def ppo_rewards(
    r_c: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards of section 3.2.3: -beta * KL on every response token, plus the
    whitened logit of R_c on the last one. r_c: [B] raw reward-model scores (logits, the
    inverse sigmoid of the paper's probabilities); kl, mask: [B, T] -> [B, T]."""
    score = whiten_scores(r_c.float())
    rewards = -beta * kl * mask
    last = mask.long().cumsum(-1).argmax(-1)  # index of each row's last response token
    rewards[torch.arange(len(r_c)), last] += score
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [B, T] (masked tokens get none):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; returns A, A + V."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype)
    next_adv = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_adv = torch.where(m.bool(), adv, next_adv)
    return advantages, advantages + values * mask


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (Schulman et al. 2017), as a loss over masked tokens;
    also returns the fraction of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped)
    n = mask.sum().clamp(min=1)
    clip_frac = ((clipped < unclipped).float() * mask).sum() / n
    return (loss * mask).sum() / n, clip_frac


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), masked mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum() / mask.sum().clamp(min=1)
