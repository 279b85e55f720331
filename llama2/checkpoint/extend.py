"""From a Llama 2 checkpoint to a Code Llama starting point: the vocabulary grown by Code
Llama's 16 infilling pieces, the embedding and output matrices grown to match."""

from __future__ import annotations

import dataclasses

import torch

from ..tokenizer import CODE_LLAMA_PIECES, add_infill_pieces
from .common import Checkpoint, StateDict


def grow_rows(weight: torch.Tensor, n: int) -> torch.Tensor:
    """`weight` [V, d] with n rows appended, each the mean row: a new token starts out as an
    average token, which keeps the logits of existing tokens unchanged in expectation and
    the new ones neither dominant nor negligible (the usual choice when adding tokens)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(n, -1)])


def add_infill_tokens(ckpt: Checkpoint, where: str = "checkpoint") -> Checkpoint:
    """`ckpt` with Code Llama's vocabulary: the tokenizer's pieces plus the 16 infilling
    pieces (ids 32000-32015 on Llama 2's 32000, `▁<PRE>` 32007 ... `▁<EOT>` 32010), the
    token embeddings and the output head grown by their mean row, the config's vocab_size
    raised. Existing tokens keep their ids and weights, so their logits do not change."""
    if ckpt.tokenizer is None:
        raise ValueError(f"{where}: no tokenizer.model: the infilling pieces extend a tokenizer")
    if ckpt.quantization is not None:
        raise ValueError(f"{where}: a quantized model cannot grow its vocabulary")
    tok, cfg = ckpt.tokenizer, ckpt.config
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tok.vocab_size} pieces but the model "
            f"{cfg.vocab_size} embeddings; they must match to append the infilling pieces"
        )
    new_tok = add_infill_pieces(tok)  # (refuses a vocabulary that has them already)
    n = len(CODE_LLAMA_PIECES)
    sd: StateDict = dict(ckpt.state_dict)
    sd["tok_embeddings.weight"] = grow_rows(sd["tok_embeddings.weight"], n)
    if ckpt.head == "lm":  # a reward model's head is a scalar: nothing to grow
        sd["output.weight"] = grow_rows(sd["output.weight"], n)
    config = cfg.replace(vocab_size=cfg.vocab_size + n)
    return dataclasses.replace(ckpt, config=config, state_dict=sd, tokenizer=new_tok)
