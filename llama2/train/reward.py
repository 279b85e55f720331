"""Reward models (Llama 2, section 3.2.2): the language model with its output layer replaced
by a scalar head, read at each answer's last token (its EOS), trained with the binary ranking
loss and a margin by rating. Saved in HF layout as LlamaForSequenceClassification.

Run it twice, on helpfulness and on safety data, for the paper's two reward models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_hf
from ..data.preferences import RATINGS, read_preferences
from ..data.sft import encode_for_training
from ..data.split import split_held_out
from ..kernels import Linear
from ..llm import load
from ..model import Context
from .config import RewardConfig
from .loop import Dist, Stage, epoch_indices, held_out_chunks, train
from .losses import MARGINS, ranking_loss


def scores(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's score at its last token: [B]."""
    return model(tokens, None, Context(output_index=lengths - 1))[:, 0, 0].float()


def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out, lengths


def build_reward(cfg: RewardConfig, device: torch.device, d: Dist) -> Stage:
    if not cfg.init_from or not cfg.data:
        raise ValueError("reward needs init_from=MODEL_DIR and data=PAIRS.jsonl")
    base = load(cfg.init_from, dtype=torch.float32)
    tok = base.tokenizer
    if tok is None:
        raise ValueError(f"{cfg.init_from}: no tokenizer.model")
    model = base.model
    if base.head != "score":  # a language model: give it a fresh scalar head
        model.output = Linear(base.config.dim, 1, bias=False)
        nn.init.normal_(model.output.weight, std=base.config.dim**-0.5)
    pairs = read_preferences(cfg.data)
    margins = MARGINS[cfg.margin]

    def encode(p, answer):
        ids = encode_for_training(tok, [*p.prompt, {"role": "assistant", "content": answer}])[0]
        if len(ids) <= cfg.seq_len:
            return ids
        # keep the end (the score is read at the last token) and BOS, which every sequence
        # the model saw in pretraining starts with
        return ids[:1] + ids[len(ids) - cfg.seq_len + 1 :]

    data = [
        (
            encode(p, p.chosen),
            encode(p, p.rejected),
            p.margin if p.margin is not None else margins.get(p.rating, 0.0),
            p.rating,
            p.is_safety,
        )
        for p in pairs
    ]
    train_pairs, held = split_held_out(data)
    n = len(train_pairs)

    def collate(items):
        tokens, lengths = pad([c for c, *_ in items] + [r for _, r, *_ in items])
        margin = torch.tensor([m for _, _, m, *_ in items], dtype=torch.float32)
        return tokens, lengths, margin

    def batch(step: int, part: int, parts: int):
        return collate([train_pairs[i] for i in epoch_indices(step, n, cfg, part, parts)])

    def loss(m, b):
        tokens, lengths, margin = b
        s = scores(m, tokens, lengths)
        half = len(margin)
        return ranking_loss(s[:half], s[half:], margin)

    def val_batches(rank: int, world: int):
        for chunk in held_out_chunks(len(held), cfg.batch_size, rank, world):
            yield collate([held[i] for i in chunk])

    def val_metrics(m) -> dict:
        """Held-out accuracy: how often the chosen answer scores higher, overall, by rating,
        and by kind (safety / helpfulness pairs, as the paper's table 7 reports them) where
        the held-out pairs hold both kinds."""
        right: dict[str, list[bool]] = {}
        kinds: dict[str, list[bool]] = {}
        for i in range(0, len(held), cfg.batch_size):
            items = held[i : i + cfg.batch_size]
            tokens, lengths, _ = collate(items)
            s = scores(m, tokens.to(device), lengths.to(device))
            for (*_, rating, is_safety), ok in zip(
                items, (s[: len(items)] > s[len(items) :]).tolist(), strict=True
            ):
                right.setdefault(rating or "unrated", []).append(ok)
                kinds.setdefault("safety" if is_safety else "helpful", []).append(ok)
        out = {
            "val_accuracy": sum(map(sum, right.values())) / max(1, sum(map(len, right.values())))
        }
        for rating in (*RATINGS, "unrated"):
            if rating in right:
                out[f"val_accuracy_{rating}"] = sum(right[rating]) / len(right[rating])
        if len(kinds) == 2:
            for kind, oks in kinds.items():
                out[f"val_accuracy_{kind}"] = sum(oks) / len(oks)
        return out

    def save_model(state_dict: dict, path: Path) -> None:
        save_hf(path, base.config, state_dict, tok, head="score")

    return Stage(
        model=model,
        batch=batch,
        loss=loss,
        save_model=save_model,
        val_batches=val_batches if held else None,
        val_metrics=val_metrics if held else None,
        # the pairs are padded to their longest answer: count the real tokens
        batch_tokens=lambda b: int(b[1].sum()),
        loss_label="ranking loss",
        perplexity=False,  # exp of a ranking loss is no perplexity
    )


def reward(cfg: RewardConfig, out: str | Path, resume: bool = False) -> list[dict]:
    return train(cfg, Path(out), lambda device, d: build_reward(cfg, device, d), resume)
