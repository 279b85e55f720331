"""EleutherAI's lm-evaluation-harness over this library, without a server: the model class
`Llama2LM`, registered in lm_eval as `llama2` (loglikelihood, loglikelihood_rolling,
generate_until).

lm_eval (0.4.x) knows the models of its own registry only: it has no entry points for other
packages' models, so `llama2` is a name there once this module is imported. From the shell,
`python -m llama2.eval.harness` is lm_eval's command line with it registered:

    python -m llama2.eval.harness --model llama2 --model_args pretrained=PATH --tasks hellaswag

and from Python, `import llama2.eval.harness` before `lm_eval.simple_evaluate(model="llama2",
...)`. model_args: pretrained (a checkpoint in any layout llama2.load reads), dtype,
max_length (default: the model's context), add_bos_token (default true: Llama 2 was trained
with BOS at the start of every document), max_gen_toks, seed, compile (decode through the
compiled step); --batch_size (rows per forward; "auto": as many as fill 16,384 tokens) and
--device (a CUDA device falls back to the CPU where there is none).

Scoring is batched: the requests, longest first, run B at a time through one forward each,
right-padded (causal attention: padding after a row never reaches it), and the output head
runs only at the positions that predict continuation tokens. A request longer than the context
keeps its last max_length tokens (as lm_eval's HF model does); a rolling loglikelihood is
scored over lm_eval's disjoint windows of max_length tokens, each conditioned on the token
before it (the first on BOS).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from ..generation import SamplingParams, generate
from ..llm import Llama, load

log = logging.getLogger(__name__)

AUTO_BATCH_TOKENS = 16_384  # --batch_size auto: rows per forward so that they hold about these


def register() -> None:
    """Make `llama2` a model name of lm_eval's (idempotent). The class is named by its import
    path, so that it is imported as this module even when this file runs as __main__."""
    import lm_eval.models  # noqa: F401  (lm_eval's own models: its registry fills itself only while empty)
    from lm_eval.api.registry import model_registry

    if "llama2" not in model_registry:
        model_registry.register("llama2", target="llama2.eval.harness:Llama2LM")


def _device(device: str | None) -> str | None:
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("%s is not available: the model runs on the CPU", device)
        return "cpu"
    return device


class Llama2LM(TemplateLM):
    """lm_eval's model over a checkpoint (or a loaded Llama): the keyword arguments are the
    model_args of the module's docstring, plus lm_eval's batch_size, max_batch_size and
    device."""

    def __init__(
        self,
        pretrained: str | Path | Llama,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        add_bos_token: bool = True,
        max_gen_toks: int = 256,
        seed: int = 1234,
        compile: bool = False,
        **unused,
    ):
        super().__init__()
        if unused:
            log.warning("llama2: model_args not used: %s", ", ".join(unused))
        if isinstance(pretrained, Llama):
            self.llm = pretrained
        else:
            self.llm = load(pretrained, dtype=dtype, device=_device(device))
        if self.llm.tokenizer is None:
            raise ValueError(f"{pretrained}: no tokenizer beside the weights")
        self.tok, self.model = self.llm.tokenizer, self.llm.model.eval()
        self.max_length = int(max_length or self.llm.config.max_seq_len)
        if not 2 <= self.max_length <= self.llm.config.max_seq_len:
            raise ValueError(f"max_length must be in 2..{self.llm.config.max_seq_len}")
        self.auto_batch = str(batch_size) == "auto"
        self.batch_size = 0 if self.auto_batch else int(batch_size)
        self.max_batch_size = int(max_batch_size or 64)
        self.add_bos_token, self.max_gen_toks = bool(add_bos_token), int(max_gen_toks)
        self.seed, self.compile = seed, bool(compile)

    # --- tokens --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on: BOS, as every document began in training."""
        return self.tok.bos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tok.sha256()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens: Sequence[int], **_) -> str:
        return self.tok.decode(tokens)

    # --- scoring -------------------------------------------------------------------------

    def _batches(self, order: list[int], lengths: Mapping[int, int]) -> Iterator[list[int]]:
        """`order` (longest first) in batches: batch_size rows, or with "auto" as many as fill
        AUTO_BATCH_TOKENS at the longest row's length."""
        i = 0
        while i < len(order):
            n = self.batch_size
            if self.auto_batch:
                n = min(self.max_batch_size, max(1, AUTO_BATCH_TOKENS // lengths[order[i]]))
            yield order[i : i + n]
            i += n

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation given the context, whether it is the greedy
        continuation) for each (context, continuation) of token ids."""
        rows, targets = [], []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("a continuation has no tokens")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens > max_length")
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append(whole[:-1])  # (the last token is predicted, never fed)
            targets.append(continuation)
        lengths = dict(enumerate(map(len, rows)))
        order = sorted(range(len(rows)), key=lambda i: -lengths[i])
        device = self.model.tok_embeddings.weight.device
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for batch in self._batches(order, lengths):
            tokens = torch.zeros(len(batch), lengths[batch[0]], dtype=torch.long)
            for b, i in enumerate(batch):
                tokens[b, : lengths[i]] = torch.tensor(rows[i])
            hidden = self.model.hidden(tokens.to(device))
            # the positions that predict continuation tokens, over the whole batch
            at_row = [b for b, i in enumerate(batch) for _ in targets[i]]
            at_pos = [p for i in batch for p in range(lengths[i] - len(targets[i]), lengths[i])]
            h = hidden[torch.tensor(at_row, device=device), torch.tensor(at_pos, device=device)]
            logprobs = self.model.output(h).float().log_softmax(-1)
            want = torch.tensor([t for i in batch for t in targets[i]], device=device)
            chosen = logprobs.gather(-1, want[:, None])[:, 0].double()
            greedy = logprobs.argmax(-1) == want
            start = 0
            for i in batch:
                end = start + len(targets[i])
                out[i] = (float(chosen[start:end].sum()), bool(greedy[start:end].all()))
                start = end
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
        """requests: (cache key, context ids, continuation ids) each."""
        results = self._score([(list(c), list(x)) for _, c, x in requests])
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability over lm_eval's disjoint windows of max_length tokens."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ----------------------------------------------------------------------

    def _params(self, kwargs: dict) -> SamplingParams:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        params = SamplingParams(
            max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
            temperature=temperature,
            top_p=float(kwargs.pop("top_p", 1.0)),
            top_k=int(kwargs.pop("top_k", 0)),
            seed=int(kwargs.pop("seed", self.seed)),
            stop=tuple(s for s in until if s),
        )
        if kwargs:
            log.warning("llama2: generation settings not used: %s", ", ".join(kwargs))
        return params

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched by the requests' generation settings (greedy unless they sample); each
        context keeps its last max_length - max_gen_toks tokens, and stops at EOS or at the
        first of its `until` strings (not included)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            params = self._params(requests[members[0]].args[1])
            keep = max(1, self.max_length - params.max_new_tokens)
            prompts = {i: self.tok_encode(requests[i].args[0])[-keep:] for i in members}
            lengths = {i: len(p) for i, p in prompts.items()}
            order = sorted(members, key=lambda i: -lengths[i])
            for batch in self._batches(order, lengths):
                done = generate(
                    self.model,
                    self.tok,
                    [prompts[i] for i in batch],
                    params,
                    (self.tok.eos_id,),
                    compile=self.compile,
                )
                for i, completion in zip(batch, done, strict=True):
                    out[i] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


register()


def main() -> None:
    """lm_eval's command line, with `llama2` among its models."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
