"""The objectives of Llama 2's alignment (paper, section 3) and DPO, as plain functions.

Every function takes per-example (or per-token) tensors and returns a scalar mean unless
its docstring says otherwise, so that each can be checked against numbers worked by hand.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data.preferences import RATINGS
from ..kernels import Linear
from ..model import Context

CE_CHUNK_ROWS = 256  # rows of logits per chunk: 32 MB of fp32 at a 32,000-token vocabulary

# Section 3.2.2, table 27: the margin m(r) added to the ranking loss for each rating.
MARGINS = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0), strict=True)),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0), strict=True)),
}


def next_token_cross_entropy(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    ctx: Context | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `targets` ([B, T]; `ignore_index` carries no loss) under the model's
    logits for `inputs` (`ctx`: the model's Context, e.g. packed segments). On a CPU, for a plain
    output head, the head and the loss are computed together in chunks of rows
    (`OutputCrossEntropy`); otherwise (FSDP, LoRA or quantized heads, accelerators) from the
    model's logits."""
    model_ = getattr(model, "_orig_mod", model)  # (under torch.compile)
    out = getattr(model_, "output", None)
    w = getattr(out, "weight", None)
    fused = (
        type(out) is Linear
        and type(w) is torch.nn.Parameter
        and w.device.type == "cpu"
        and not type(model_).__name__.startswith("FSDP")
    )
    if not fused:
        logits = model(inputs, None, ctx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
    hidden = _hidden_states(model)(inputs, None, ctx)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else w.dtype
    return OutputCrossEntropy.apply(
        hidden.flatten(0, 1), w, targets.flatten().to(hidden.device), ignore_index, dtype
    )


_compiled_hidden: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hidden_states(model: torch.nn.Module):
    """The model's `hidden` method, compiled when the model is (torch.compile compiles
    `forward` only)."""
    inner = getattr(model, "_orig_mod", None)
    if inner is None:
        return model.hidden
    if model not in _compiled_hidden:
        _compiled_hidden[model] = torch.compile(inner.hidden)
    return _compiled_hidden[model]


_scratch_tensors: dict[tuple, torch.Tensor] = {}


def _scratch(name: str, shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """A scratch tensor kept from one call to the next (one per name, dtype and device; the
    memory a step needs anyway, held between steps). A tensor of tens of MB made afresh is new
    pages from the OS at every step (malloc maps allocations this large and unmaps them when
    freed), each faulted in and zeroed, which costs more than the copies into them."""
    n, key = math.prod(shape), (name, dtype, torch.device(device))
    buf = _scratch_tensors.get(key)
    if buf is None or buf.numel() < n:
        buf = _scratch_tensors[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(*shape)


class OutputCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T, targets), mean over the targets that count, computed
    CE_CHUNK_ROWS rows at a time with its gradients: each chunk's logits are made in `dtype`
    (the autocast dtype, as F.linear under autocast makes them), taken to fp32, turned into the
    loss and the softmax gradient in place while they sit in the cache, and multiplied back
    into the gradients of the hidden states and the weight. The full [tokens, vocab] fp32 logits,
    their copies between dtypes and their softmax are never in memory, so on a CPU the head
    and the loss, forward and backward, take well under the time of `F.linear` +
    `F.cross_entropy`. Without autograd (an evaluation) only the loss is computed."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, dtype: torch.dtype):
        with torch.autocast("cpu", enabled=False):
            want_h, want_w = hidden.requires_grad, weight.requires_grad
            grad = want_h or want_w
            w = weight.detach()
            if dtype != weight.dtype:
                w = _scratch("weight", w.shape, dtype, w.device).copy_(w)
            rows, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
            hd = hidden.detach().to(dtype)  # (once: the chunks and the weight's product read it)
            counted = targets != ignore_index
            total = torch.zeros((), dtype=torch.float32, device=device)
            grad_h = torch.zeros_like(hidden) if want_h else None
            # the weight's gradient: accumulated chunk by chunk in fp32; in a lower precision
            # the chunks' softmax gradients are kept (half the fp32 logits' bytes) for one
            # product at the end, where each chunk's product would be converted and added
            wide = dtype == torch.float32
            grad_w = torch.zeros(weight.shape, dtype=torch.float32) if want_w and wide else None
            kept = _scratch("kept", (rows, vocab), dtype, device) if want_w and not wide else None
            # one fp32 buffer for every chunk's logits, and one for a lower-precision product
            logits = _scratch("logits", (min(CE_CHUNK_ROWS, rows), vocab), torch.float32, device)
            narrow = None if wide else _scratch("narrow", logits.shape, dtype, device)
            for s in range(0, rows, CE_CHUNK_ROWS):
                h = hd[s : s + CE_CHUNK_ROWS]
                t, keep = targets[s : s + CE_CHUNK_ROWS], counted[s : s + CE_CHUNK_ROWS]
                t = t.where(keep, 0)
                z = logits[: h.shape[0]]
                if wide:
                    torch.mm(h, w.t(), out=z)
                else:
                    z.copy_(torch.mm(h, w.t(), out=narrow[: h.shape[0]]))
                picked = z.gather(1, t[:, None])[:, 0]
                top = z.amax(dim=1, keepdim=True)
                z.sub_(top).exp_()  # z is now exp(logits - max): the softmax's numerators
                norm = z.sum(dim=1)
                total += ((top[:, 0] + norm.log() - picked) * keep).sum()
                if not grad:
                    continue
                z.div_(norm[:, None])  # the softmax, then minus the one-hot target
                z[torch.arange(z.shape[0], device=z.device), t] -= 1
                z.mul_(keep[:, None])
                if wide:
                    g = z
                elif want_w:  # (kept for the weight's product at the end)
                    g = kept[s : s + CE_CHUNK_ROWS]
                    g.copy_(z)
                else:
                    g = z.to(dtype)
                if want_h:
                    grad_h[s : s + CE_CHUNK_ROWS] = g @ w
                if want_w and wide:
                    grad_w.addmm_(g.t(), h)
            if kept is not None:
                # (as G^T @ h, whose result lies as the weight does: h^T @ G would need a
                # transposed copy)
                grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
                product = _scratch("product", weight.shape, dtype, device)
                grad_w.copy_(torch.mm(kept.t(), hd, out=product))
        n = counted.sum()
        ctx.grads, ctx.n, ctx.weight_dtype = (grad_h, grad_w), n, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:  # (as autograd says of a freed graph)
            raise RuntimeError("OutputCrossEntropy: its backward runs once (retain_graph=False)")
        (grad_h, grad_w), scale = ctx.grads, grad_out / ctx.n
        ctx.grads = None
        # in place: the gradients were made for this call alone (a fresh product the size of
        # the head would be new pages again)
        if grad_h is not None:
            grad_h = grad_h.mul_(scale.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(scale).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


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
