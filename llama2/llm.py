"""`llama2.load(path)`: a checkpoint in any layout, as a model with its tokenizer, and the
everyday calls on it: generate, chat and infill, each batched or streamed."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import empty_model, parse_dtype, read_checkpoint
from .checkpoint.common import majority_dtype
from .config import ModelConfig
from .formats import Message, encode_chat, encode_infill, infill_ids
from .generation import DRAFT_TOKENS, CachedModel, Completion, SamplingParams, generate, stream
from .model import Transformer
from .quantize import align_buffers
from .speculative import check_draft
from .tokenizer import Tokenizer


@dataclass
class Llama:
    """A loaded model: `.model` (token ids -> float32 logits), `.tokenizer`, `.config`."""

    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    path: Path | None = None
    quantization: dict | None = None
    compile: bool = False  # decode through torch.compile (the first generation compiles)
    head: str = "lm"  # "score": a reward model, whose model() gives [B, T, 1] scores

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: no tokenizer.model beside the weights")
        return self.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str],
        draft: Llama | str | Path | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        **sampling,
    ) -> Completion | list[Completion]:
        """Continue text prompt(s) (BOS prepended). Keyword arguments: SamplingParams' fields.
        A single prompt gives a single Completion; a list gives a list, generated as a batch.
        `draft`: a smaller model with this one's tokenizer (loaded, or a path) for speculative
        decoding, proposing `draft_tokens` tokens a step; the prompts then run one by one.
        Structured output: `json_schema=` (a dict or JSON text), `json_object=True` or
        `grammar=` (GBNF) makes the text follow it (see `structured`; not with a draft)."""
        tok = self._tok()
        single = isinstance(prompts, str)
        ids = [tok.encode(p, bos=True) for p in ([prompts] if single else prompts)]
        params = SamplingParams(**sampling)
        if draft is not None:
            draft = self.draft_model(draft)
        out = generate(
            self.model, tok, ids, params, (tok.eos_id,), compile=self.compile, draft=draft,
            draft_tokens=draft_tokens,
        )  # fmt: skip
        return out[0] if single else out

    def stream(
        self,
        prompt: str,
        draft: Llama | str | Path | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        **sampling,
    ) -> Iterator[str]:
        tok = self._tok()
        ids = tok.encode(prompt, bos=True)
        params = SamplingParams(**sampling)
        if draft is not None:
            draft = self.draft_model(draft)
        return stream(
            self.model, tok, ids, params, (tok.eos_id,), compile=self.compile, draft=draft,
            draft_tokens=draft_tokens,
        )  # fmt: skip

    def draft_model(self, draft: Llama | str | Path) -> Transformer:
        """A draft model for this one: loaded onto this model's device, tokenizer checked."""
        if not isinstance(draft, Llama):
            draft = load(draft, device=self.device)
        if draft.tokenizer is None:
            raise ValueError(f"draft {draft.path}: no tokenizer.model beside the weights")
        check_draft(self._tok(), draft.tokenizer)
        return draft.model

    def chat(
        self, dialogs: Sequence[Message] | Sequence[Sequence[Message]], **sampling
    ) -> Completion | list[Completion]:
        """Answer dialog(s) in the Llama 2 chat format. One dialog (a list of messages) gives
        one Completion; a list of dialogs gives a list."""
        tok = self._tok()
        single = bool(dialogs) and isinstance(dialogs[0], Mapping)
        ids = [encode_chat(tok, d) for d in ([dialogs] if single else dialogs)]
        params = SamplingParams(**sampling)
        out = generate(
            self.model, tok, ids, params, (tok.eos_id,), continuation=False, compile=self.compile
        )
        return out[0] if single else out

    def chat_stream(self, dialog: Sequence[Message], **sampling) -> Iterator[str]:
        tok = self._tok()
        params = SamplingParams(**sampling)
        ids = encode_chat(tok, dialog)
        return stream(
            self.model, tok, ids, params, (tok.eos_id,), continuation=False, compile=self.compile
        )

    def infill(
        self, prefix: str, suffix: str, suffix_first: bool = False, **sampling
    ) -> Completion:
        """Code Llama infilling: the text between prefix and suffix, stopping at <EOT>."""
        tok = self._tok()
        ids = encode_infill(tok, prefix, suffix, suffix_first)
        stop = (tok.eos_id, infill_ids(tok)["eot"])
        return generate(
            self.model, tok, [ids], SamplingParams(**sampling), stop, compile=self.compile
        )[0]

    def infill_stream(
        self, prefix: str, suffix: str, suffix_first: bool = False, **sampling
    ) -> Iterator[str]:
        tok = self._tok()
        ids = encode_infill(tok, prefix, suffix, suffix_first)
        stop = (tok.eos_id, infill_ids(tok)["eot"])
        return stream(self.model, tok, ids, SamplingParams(**sampling), stop, compile=self.compile)


def build_model(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    quantization: dict | None = None,
    head: str = "lm",
) -> Transformer:
    """A Transformer whose parameters *are* the given tensors (no copy), built on meta."""
    model = empty_model(config, quantization, head)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    if quantization is not None:
        align_buffers(model)
    return model.eval()


def load(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Llama:
    """Load a checkpoint in any supported layout (HF directory, Meta directory, GGUF file).

    Tensors keep their stored dtype unless `dtype` is given (a file of mixed dtypes, as GGUF's
    f32 norms beside f16 matrices, takes the dtype of most parameters); HF safetensors stay
    memory-mapped.
    """
    ckpt = read_checkpoint(path)
    tok = ckpt.tokenizer
    if tok is not None and tok.vocab_size > ckpt.config.vocab_size:
        raise ValueError(
            f"{path}: tokenizer has {tok.vocab_size} pieces but the model only "
            f"{ckpt.config.vocab_size} embeddings"
        )
    sd = ckpt.state_dict
    if ckpt.quantization is None:
        dtype = parse_dtype(dtype) or majority_dtype(sd)
        sd = {k: v.to(dtype) for k, v in sd.items()}  # a no-op (no copy) where it already is
    elif dtype is not None:  # quantized: `dtype` is that of the embeddings and norms
        dtype = parse_dtype(dtype)
        sd = {k: v.to(dtype) if _is_plain(k) else v for k, v in sd.items()}
    model = build_model(ckpt.config, sd, ckpt.quantization, ckpt.head)
    if device is not None:
        model = model.to(device)
    return Llama(model, ckpt.tokenizer, ckpt.config, Path(path), ckpt.quantization, head=ckpt.head)


def _is_plain(name: str) -> bool:
    return name.endswith("norm.weight") or name.startswith("tok_embeddings")


@dataclass
class DecodeChoice:
    """What `choose_decode` measured: one batch-1 decode step's median milliseconds, eager
    and compiled, the seconds compiling took, and whether the compiled step is the faster."""

    compiled: bool
    compiled_ms: float
    eager_ms: float
    compile_s: float


@torch.inference_mode()
def choose_decode(
    model: Transformer,
    slots: int = 1,
    length: int | None = None,
    steps: int = 6,
    rounds: int = 3,
) -> DecodeChoice:
    """Compile the model's decode step for a cache of `slots` rows of `length` positions
    (default: the context) and time single-row steps of it against eager ones: `rounds`
    alternating rounds of `steps` steps each (after two warm-up steps), each path's time the
    median of its best round (a CPU shared with other work is slower by bursts, which
    alternating rounds do not charge to one path only). The compiled graph and its static
    cache stay with the model, so a CachedModel of the same shape that compiles afterwards
    reuses them instead of compiling again: give the shape the caller decodes with."""
    length = length or model.config.max_seq_len
    prompt = [1] * min(8, length - steps - 3)

    def round_ms(compiled: bool) -> float:
        size = (slots, length) if compiled else (1, len(prompt) + steps + 3)
        cached = CachedModel(model, *size, compile=compiled)
        try:
            cached.prefill([prompt])
            times, pos = [], len(prompt)
            for i in range(steps + 2):
                t0 = time.perf_counter()
                float(cached.decode([1], [pos + i])[0, 0])  # (float: waits for an accelerator)
                times.append(time.perf_counter() - t0)
            return sorted(times[2:])[steps // 2] * 1e3
        finally:
            cached.close()

    t0 = time.perf_counter()
    cached = CachedModel(model, slots, length, compile=True)
    try:
        cached.prefill([prompt])
        float(cached.decode([1], [len(prompt)])[0, 0])  # (the first call compiles)
    finally:
        cached.close()
    compile_s = time.perf_counter() - t0
    compiled_ms, eager_ms = [], []
    for _ in range(rounds):
        compiled_ms.append(round_ms(True))
        eager_ms.append(round_ms(False))
    best = min(compiled_ms), min(eager_ms)
    return DecodeChoice(best[0] < best[1], best[0], best[1], compile_s)
