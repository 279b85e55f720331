"""Direct Preference Optimization (Rafailov et al. 2023), the simpler alternative to the
paper's reward model + PPO: the policy is trained on preference pairs directly, against a
frozen copy of its initial self. Same data as `llama2 reward`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import save_hf
from ..data.preferences import read_preferences
from ..data.split import split_held_out
from ..formats import chat_segments
from ..llm import load
from .config import DPOConfig
from .loop import Dist, Stage, epoch_batches, held_out_chunks, train
from .losses import dpo_loss


def answer_logprobs(model, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's answer tokens: [B]."""
    logits = model(tokens[:, :-1]).float()
    logp = torch.gather(F.log_softmax(logits, -1), 2, tokens[:, 1:, None])[..., 0]
    return (logp * loss_mask[:, 1:]).sum(-1)


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_len: int
) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
    """(ids, loss mask) of chosen and rejected, each at most max_len tokens, cut together so
    that both keep the same prompt tokens: DPO's log-ratio compares the two answers in one
    context (cut separately, the prompts would differ and the answers' log-probabilities would
    no longer be comparable). The answers are cut first (their ends), down to half the row;
    then the prompt loses its start but keeps its BOS and its end, where the answer follows.
    The loss is on the answer only: a multi-turn prompt's earlier answers are context."""
    longest = max(len(chosen), len(rejected))
    room = max(max_len - len(prompt), min(longest, max_len // 2))  # for the answers
    if len(prompt) > max_len - room:
        keep = max_len - room
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1 :]
    out = []
    for answer in (chosen, rejected):
        answer = answer[:room]
        out.append((prompt + answer, [False] * len(prompt) + [True] * len(answer)))
    return out[0], out[1]


def real_tokens(batch) -> int:
    """The tokens of a padded DPO batch without its padding: each row ends with its answer,
    so its length is one past its last loss token."""
    mask = batch[1]
    return int((mask.shape[1] - mask.flip(-1).argmax(-1)).sum())


def build_dpo(cfg: DPOConfig, device: torch.device, d: Dist) -> Stage:
    if not cfg.init_from or not cfg.data:
        raise ValueError(
            "dpo needs init_from=MODEL_DIR (usually the SFT model) and data=PAIRS.jsonl"
        )
    policy = load(cfg.init_from, dtype=torch.float32)
    reference = (
        load(cfg.init_from, dtype=torch.float32).model.to(device).eval().requires_grad_(False)
    )
    tok = policy.tokenizer
    pairs = read_preferences(cfg.data)

    def encode(p):
        both = [
            chat_segments(tok, [*p.prompt, {"role": "assistant", "content": a}])
            for a in (p.chosen, p.rejected)
        ]
        # the prompt (with its history) ends where the last answer starts; the same in both
        prompt = [t for pr, an in both[0][:-1] for t in pr + an] + both[0][-1][0]
        return truncate_pair(prompt, both[0][-1][1], both[1][-1][1], cfg.seq_len + 1)

    data = [encode(p) for p in pairs]
    train_pairs, held = split_held_out(data)

    def collate(items):
        seqs = [c for c, _ in items] + [r for _, r in items]
        width = max(len(ids) for ids, _ in seqs)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width)
        for i, (ids, m) in enumerate(seqs):
            tokens[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
        with torch.no_grad():
            ref = answer_logprobs(reference, tokens.to(device), mask.to(device)).cpu()
        return tokens, mask, ref

    def loss(model, b):
        tokens, mask, ref = b
        logp = answer_logprobs(model, tokens, mask)
        half = len(ref) // 2
        return dpo_loss(logp[:half], logp[half:], ref[:half], ref[half:], cfg.beta)

    def val_batches(rank: int, world: int):
        for chunk in held_out_chunks(len(held), cfg.batch_size, rank, world):
            yield collate([held[i] for i in chunk])

    def val_metrics(model) -> dict:
        """Held-out: how often the implicit reward beta*(log pi - log pi_ref) prefers chosen."""
        right = []
        for i in range(0, len(held), cfg.batch_size):
            tokens, mask, ref = collate(held[i : i + cfg.batch_size])
            margin = answer_logprobs(model, tokens.to(device), mask.to(device)).cpu() - ref
            half = len(ref) // 2
            right += (margin[:half] > margin[half:]).tolist()
        return {"val_reward_accuracy": sum(right) / max(1, len(right))}

    def save_model(state_dict: dict, path: Path) -> None:
        save_hf(path, policy.config, state_dict, tok)

    return Stage(
        model=policy.model,
        batch=epoch_batches(train_pairs, cfg, collate),
        loss=loss,
        save_model=save_model,
        val_batches=val_batches if held else None,
        val_metrics=val_metrics if held else None,
        batch_tokens=real_tokens,
        loss_label="DPO loss",
        perplexity=False,  # a loss over pairs, not per token
    )


def dpo(cfg: DPOConfig, out: str | Path, resume: bool = False) -> list[dict]:
    return train(cfg, Path(out), lambda device, d: build_dpo(cfg, device, d), resume)
