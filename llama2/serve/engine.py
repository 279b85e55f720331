"""Continuous batching: requests join and leave the running batch at token boundaries.

One thread owns the model and a KV cache of `max_batch` slots. Each iteration it admits
waiting requests into free slots (a prefill each), then advances every running request by
one token in a single batched forward (each row at its own position, in its own slot).
A request that finishes, or whose client went away, frees its slot at once. Each request
decodes through generation.py's RowDecoder (sampling, stop ids and strings, logprobs, text),
as the library's rows do, so its output is the library's and does not depend on what it was
batched with.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import RowDecoder, SamplingParams
from ..model import Transformer
from ..tokenizer import Tokenizer


class QueueFull(Exception):
    pass


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: Sequence[int]
    # emit("token", (text, TokenLogprob | None)) for each piece, then emit("done", Completion)
    emit: Callable[[str, object], None]
    continuation: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Running:
    req: Request
    slot: int
    pos: int
    logits: torch.Tensor
    decoder: RowDecoder
    last_token_time: float = 0.0


class Stats:
    """Counters for /metrics (Prometheus)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            getattr(self, name).append(value)


class Engine:
    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = model.config.max_seq_len
        self.device = model.tok_embeddings.weight.device
        model.setup_cache(max_batch, self.context)
        self.free = list(range(max_batch))
        self.running: list[_Running] = []
        self.waiting: deque[Request] = deque()
        self.stats = Stats()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="llama2-engine", daemon=True)
        self.thread.start()

    # --- public ----------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        if len(req.prompt) >= self.context:
            raise ValueError(
                f"the prompt has {len(req.prompt)} tokens; the context is {self.context}"
            )
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(req)
            with self.stats.lock:
                self.stats.requests += 1
                self.stats.prompt_tokens += len(req.prompt)
            self.cond.notify()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def shutdown(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopping and not self.waiting and not self.running:
                        self.cond.wait()
                    if self.stopping:
                        return
                    admit = []
                    while self.waiting and self.free:
                        req = self.waiting.popleft()
                        if not req.cancelled.is_set():
                            admit.append((req, self.free.pop()))
                for req, slot in admit:
                    self._prefill(req, slot)
                if self.running:
                    self._step()

    def _prefill(self, req: Request, slot: int) -> None:
        tokens = torch.tensor([req.prompt], device=self.device)
        logits = self.model(tokens, start_pos=0, slots=[slot])[0, -1]
        decoder = RowDecoder(
            self.tokenizer,
            req.params,
            req.stop_ids,
            req.continuation,
            budget=min(req.params.max_new_tokens, self.context - len(req.prompt)),
            seed=req.params.seed,
            device=self.device,
        )
        self.running.append(_Running(req, slot, len(req.prompt), logits, decoder))

    def _release(self, r: _Running) -> None:
        self.running.remove(r)
        with self.cond:
            self.free.append(r.slot)

    def _step(self) -> None:
        now = time.perf_counter()
        for r in list(self.running):
            if r.req.cancelled.is_set():  # the client went away: free the slot now
                self._release(r)
                continue
            out = r.decoder.step(r.logits)
            if out.token_id is not None:
                if len(r.decoder.stream.ids) == 1:
                    self.stats.observe("ttft", now - r.req.submitted)
                else:
                    self.stats.observe("itl", now - r.last_token_time)
                r.last_token_time = now
                with self.stats.lock:
                    self.stats.generated_tokens += 1
            if out.text or out.logprob is not None:
                r.req.emit("token", (out.text, out.logprob))
            if out.finished:
                r.req.emit("done", r.decoder.completion(len(r.req.prompt)))
                self._release(r)
        if not self.running:
            return
        tokens = torch.tensor([[r.decoder.last_token] for r in self.running], device=self.device)
        logits = self.model(
            tokens,
            start_pos=torch.tensor([r.pos for r in self.running]),
            slots=[r.slot for r in self.running],
        )
        for i, r in enumerate(self.running):
            r.logits = logits[i, -1]
            r.pos += 1
