"""Continuous batching: requests join and leave the running batch at token boundaries.

One thread owns the model and a KV cache of `max_batch` slots. Each iteration it

1. admits waiting requests into free slots. A prompt that starts with tokens already computed
   (every chat request of an application starts with the same system prompt) takes their keys
   and values instead of recomputing them (prefix caching; positions depend only on the tokens
   before them), from whichever holds the most of them: a free slot (as it is: it keeps its
   last request's), a busy slot or the prefix pool (prefix.py: so that several system prompts
   that alternate over fewer slots all stay cached), copied;
2. prefills up to `prefill_chunk` prompt tokens of the admitted requests in one batched forward
   (shortest first), a long prompt over several iterations (chunked prefill) so that the
   running streams keep decoding between its chunks;
3. samples one token for every running request and advances them all in one batched forward
   (each row at its own position, in its own slot).

Each request decodes through a RowDecoder (echo.py's: it also reports the prompt's logprobs for
`echo`), as the library's rows do, so its output is the library's whatever it is batched with.
A request that finishes, whose client went away or whose deadline passed frees its slot at
once. An exception fails only the requests it touches (a forward's rows, or the one request
whose sampling raised) with a 500; the engine goes on serving and counts it for /health.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import DRAFT_TOKENS, CachedModel, SamplingParams, StepOutput
from ..model import Transformer
from ..tokenizer import Tokenizer
from .draft import Speculator
from .echo import ServedDecoder, prompt_logprobs
from .failures import Failure, QueueFull, Unavailable, expired, internal, timed_out
from .metrics import Stats
from .prefix import PREFIX_BLOCK, PrefixPool


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: Sequence[int]
    # emit("token", (text, TokenLogprob | None)) for each piece, then emit("done", Completion)
    # or emit("error", Failure) when the request could not be completed
    emit: Callable[[str, object], None]
    continuation: bool = True
    timeout: float | None = None  # seconds from submission; past it the request is ended
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Seq:
    req: Request
    slot: int
    pos: int  # cache positions of this slot written for it (prompt, then fed tokens)
    decoder: ServedDecoder | None = None  # set when the prompt is prefilled
    prompt_logprobs: list = field(default_factory=lambda: [None])  # (echo: see echo.py)
    logits: torch.Tensor | None = None  # [V]: the next token's, while decoding
    last_token_time: float = 0.0

    @property
    def prefilled(self) -> bool:
        return self.decoder is not None


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        prefix_cache: bool = True,
        compile: bool = False,
        prefix_pool_blocks: int | None = None,
        draft: Transformer | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        thread: bool = True,
    ):
        """`prefix_pool_blocks`: the prefix pool's size in blocks of PREFIX_BLOCK tokens
        (default: two contexts' worth; 0: no pool, prefixes are reused from slots only).
        `draft`: a model with this vocabulary proposing `draft_tokens` tokens (draft.py).
        `thread`: run the loop in a thread of its own, started here; else the caller runs it
        (`run`), and requests are taken from now on."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if prefix_pool_blocks is not None and prefix_pool_blocks < 0:
            raise ValueError(f"prefix_pool_blocks must be >= 0, got {prefix_pool_blocks}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.prefix_cache, self.compile = prefill_chunk, prefix_cache, compile
        self.context = model.config.max_seq_len
        self.device = model.tok_embeddings.weight.device
        self.step = CachedModel(model, max_batch, self.context, compile)
        self.caches = self.step.caches
        if prefix_pool_blocks is None:
            prefix_pool_blocks = 2 * self.context // PREFIX_BLOCK
        self.pool = None
        if prefix_cache and prefix_pool_blocks:
            self.pool = PrefixPool(self.caches, prefix_pool_blocks)
        self.free = deque(range(max_batch))  # least recently used first
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # valid cache rows
        self.prefilling: list[_Seq] = []
        self.running: list[_Seq] = []
        self.waiting: deque[Request] = deque()
        self.stats = Stats()
        self.speculator = None if draft is None else Speculator(self, draft, draft_tokens)
        self.cond = threading.Condition()
        self.stopping = False
        self.ended = False  # the loop has returned (or died)
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self._loop, name="llama2-engine", daemon=True)
            self.thread.start()

    # --- public ----------------------------------------------------------------------------

    def submit(self, reqs: Sequence[Request]) -> None:
        """Queue requests, all or none (the choices of one API request go together)."""
        for req in reqs:
            if not req.prompt:
                raise ValueError("the prompt is empty")
            if len(req.prompt) >= self.context:
                raise ValueError(
                    f"the prompt has {len(req.prompt)} tokens; the context is {self.context}"
                )
        with self.cond:
            if self.stopping or not self.alive:
                raise Unavailable("the server is shutting down" if self.stopping else "no engine")
            self._drop_abandoned()
            if len(self.waiting) + len(reqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.extend(reqs)
            with self.stats.lock:
                self.stats.requests += len(reqs)
                self.stats.prompt_tokens += sum(len(r.prompt) for r in reqs)
            self.cond.notify()

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def alive(self) -> bool:
        return not self.ended and (self.thread is None or self.thread.is_alive())

    def run(self) -> None:
        """The loop, in the calling thread (an engine made with thread=False), until
        `shutdown`."""
        self._loop()

    def width(self, highest_slot: int) -> int:
        """The rows of a compiled step whose highest running slot is this one: the slots up to
        it, rounded up to a power of two (few graphs), at most max_batch."""
        return min(1 << highest_slot.bit_length(), self.max_batch)

    def widths(self) -> list[int]:
        """Every width the compiled step runs."""
        return sorted({self.width(slot) for slot in range(self.max_batch)})

    def warm_up(self, log: Callable[[str], None] | None = None) -> None:
        """Compile the decode step's graph of every width now (with `compile`; before the loop
        runs, in its thread), so that the first requests to run that many streams together do
        not wait for it. The steps write one position of the empty slots, which a prefill
        overwrites: not position 0, whose length-1 cache torch.compile would take for a
        constant rather than the dynamic length the steps need."""
        if not self.compile or self.running or self.prefilling:
            return
        position = min(15, self.context - 1)
        for width in self.widths():
            t0 = time.perf_counter()
            with torch.inference_mode():
                self.step.decode([0] * width, [position] * width)
            if log:
                rows = f"{width} row{'s' if width > 1 else ''}"
                log(f"decode step of {rows} ready ({time.perf_counter() - t0:.1f} s)")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop: waiting requests fail at once (503), running ones are failed too (the HTTP
        server drains them before it calls this), then the loop ends (its thread, if it has one,
        within `timeout` seconds)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=timeout)

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # stopping, or (a BaseException) dying: nobody is left waiting forever
            unavailable = Failure(503, "the server is shutting down", "shutting_down")
            with self.cond:
                self.ended = True
                waiting, self.waiting = list(self.waiting), deque()
            for req in waiting:
                self._emit_failure(req, unavailable)
            for s in self.prefilling + self.running:
                self._fail(s, unavailable)

    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopping and not self.waiting and not self.num_running:
                        self.cond.wait()
                    if self.stopping:
                        break
                    self._drop_abandoned()
                    admit = []
                    while self.waiting and len(admit) < len(self.free):
                        admit.append(self.waiting.popleft())
                for req in admit:
                    try:
                        self._admit(req)
                    except Exception as e:
                        self._record(e)
                        self._emit_failure(req, internal(e))
                try:
                    if self.prefilling:
                        self._prefill_step()
                    if self.running:
                        (self.speculator.step if self.speculator else self._decode_step)()
                except Exception as e:  # a bug outside the guarded parts: fail what runs
                    self._record(e)
                    for s in self.prefilling + self.running:
                        self._fail(s, e)

    def _drop_abandoned(self) -> None:
        """(with self.cond) Drop waiting requests whose client went away or whose time is up."""
        now = time.perf_counter()
        keep = deque()
        for req in self.waiting:
            if req.cancelled.is_set():
                continue
            if expired(req, now):
                self._emit_failure(req, timed_out(req))
                continue
            keep.append(req)
        self.waiting = keep

    # --- admission and prefix caching ----------------------------------------------------------

    def _common(self, slot: int, prompt: list[int]) -> int:
        """How many leading prompt tokens the slot's cache holds (at most all but the last: the
        last one's forward gives the first token's logits)."""
        cached = self.slot_tokens[slot]
        n, limit = 0, min(len(cached), len(prompt) - 1)
        while n < limit and cached[n] == prompt[n]:
            n += 1
        return n

    def _admit(self, req: Request) -> None:
        prompt, reuse = req.prompt, 0
        if not self.prefix_cache or req.params.echo:  # (echo: every position's logits)
            # the lowest free slot (compiled: its step runs every slot below the highest one
            # running, see _forward_decode), else the least recently used
            slot = min(self.free) if self.compile else self.free[0]
        else:
            if self.compile:
                # the lowest free slot, whatever it holds: one stream in a high slot would run
                # a step as wide as that slot for every token; a longer prefix held in another
                # slot, free or busy, is copied into it
                slot = min(self.free)
                others = [s for s in range(self.max_batch) if s != slot]
            else:
                # where the longest computed prefix is: a free slot (taken as it is), a busy
                # slot or the pool (copied into the free slot that holds the least)
                slot = max(self.free, key=lambda s: self._common(s, prompt))
                others = [s.slot for s in self.prefilling + self.running]
            reuse = self._common(slot, prompt)
            source = max(others, key=lambda s: self._common(s, prompt), default=None)
            from_slot = 0 if source is None else self._common(source, prompt)
            blocks = [] if self.pool is None else self.pool.lookup(prompt, len(prompt) - 1)
            from_pool = len(blocks) * PREFIX_BLOCK
            if max(from_slot, from_pool) > reuse:
                if not self.compile:
                    slot = min(self.free, key=lambda s: self._common(s, prompt))
                self.slot_tokens[slot] = []  # (until the copy is complete)
                if from_pool >= from_slot:
                    self.pool.load(self.caches, slot, blocks)
                    reuse = from_pool
                else:
                    reuse = from_slot
                    self.step.copy(source, slot, reuse)
        self.free.remove(slot)
        self.slot_tokens[slot] = prompt[:reuse]
        with self.stats.lock:
            self.stats.cached_prompt_tokens += reuse
        self.prefilling.append(_Seq(req, slot, reuse))

    def _prefill_step(self) -> None:
        """Up to prefill_chunk prompt tokens in one forward (a row whose padding would run past
        the cache goes in a forward of its own). The prompts with the least left go first: a
        short prompt is not held behind a long one, and a long one waits for at most the
        max_batch - 1 others that hold slots."""
        now, budget, batch = time.perf_counter(), self.prefill_chunk, []
        for s in list(self.prefilling):
            if s.req.cancelled.is_set():
                self._release(s)
            elif expired(s.req, now):
                self._fail(s, timed_out(s.req))
        for s in sorted(self.prefilling, key=lambda s: len(s.req.prompt) - s.pos):
            if budget <= 0:
                break
            n = min(len(s.req.prompt) - s.pos, budget)
            batch.append((s, n))
            budget -= n
        # rows in one forward are padded to the widest: rows of similar widths go together
        # (at most half of a forward is padding), a row whose padding would run past the cache
        # goes alone
        groups: list[list[tuple[_Seq, int]]] = []
        for s, n in batch:  # (widths ascending)
            group = groups[-1] if groups else None
            if (
                group is None
                or n * (len(group) + 1) > 2 * (sum(m for _, m in group) + n)
                or any(x.pos + n > self.context for x, _ in group + [(s, n)])
                or s.req.params.echo != group[0][0].req.params.echo
            ):
                groups.append([(s, n)])
            else:
                group.append((s, n))
        for group in groups:
            self._prefill(group)

    def _prefill(self, group: list[tuple[_Seq, int]]) -> None:
        echo = group[0][0].req.params.echo  # (the group's rows all ask for it, or none)
        try:
            logits = self.step.prefill(
                [s.req.prompt[s.pos : s.pos + n] for s, n in group],
                [s.pos for s, _ in group],
                [s.slot for s, _ in group],
                every_position=echo,
            )
            for i, (s, n) in enumerate(group if echo else []):  # row j: prompt token pos + j + 1
                after = s.req.prompt[s.pos + 1 : s.pos + n + 1]
                s.prompt_logprobs += prompt_logprobs(logits[i], after, s.req.params.logprobs)
        except Exception as e:
            self._record(e)
            for s, _ in group:
                self._fail(s, e)
            return
        for i, (s, n) in enumerate(group):
            self.slot_tokens[s.slot].extend(s.req.prompt[s.pos : s.pos + n])
            s.pos += n
            if s.pos < len(s.req.prompt):
                continue
            try:
                p = s.req.params
                s.decoder = ServedDecoder(
                    self.tokenizer,
                    p,
                    s.req.stop_ids,
                    s.req.continuation,
                    budget=min(p.max_new_tokens, self.context - len(s.req.prompt)),
                    seed=p.seed,
                    device=self.device,
                    prompt=s.prompt_logprobs if p.echo else None,
                )
            except Exception as e:
                self._record(e)
                self._fail(s, e)
                continue
            if self.pool is not None:  # the prompt's blocks, for requests to come
                try:
                    self.pool.store(self.caches, s.slot, s.req.prompt)
                except Exception as e:  # (the request itself is fine)
                    self._record(e)
            s.logits = logits[i, n - 1] if echo else logits[i]
            self.prefilling.remove(s)
            self.running.append(s)

    # --- decoding ------------------------------------------------------------------------------

    def live(self, s: _Seq, now: float) -> bool:
        """Whether a request goes on (client gone: slot freed; past its deadline: failed)."""
        if s.req.cancelled.is_set():
            self._release(s)
            return False
        if expired(s.req, now):
            self._fail(s, timed_out(s.req))
            return False
        return True

    def deliver(self, s: _Seq, out: StepOutput, now: float) -> None:
        """A step's output to its client (and the stats); a finished request frees its slot."""
        if out.token_id is not None:
            if len(s.decoder.stream.ids) == 1:  # the first token
                self.stats.observe("ttft", now - s.req.submitted)
            else:
                self.stats.observe("itl", now - s.last_token_time)
            s.last_token_time = now
            with self.stats.lock:
                self.stats.generated_tokens += 1
        if out.text or out.logprob is not None:
            s.req.emit("token", (out.text, out.logprob))
        if out.finished:
            s.req.emit("done", s.decoder.completion(len(s.req.prompt)))
            self.stats.observe("e2e", time.perf_counter() - s.req.submitted)
            self._release(s)

    def _decode_step(self) -> None:
        now, outputs = time.perf_counter(), []
        for s in list(self.running):
            if not self.live(s, now):
                continue
            try:
                outputs.append((s, s.decoder.step(s.logits)))
            except Exception as e:  # this request's sampling
                self._record(e)
                self._fail(s, e)
        # the pieces back to back after all the sampling: one wake-up of the loop (mailbox.py)
        for s, out in outputs:
            try:
                self.deliver(s, out, now)
            except Exception as e:  # its client's queue
                self._record(e)
                self._fail(s, e)
        if not self.running:
            return
        fed = [s.decoder.last_token for s in self.running]
        try:
            logits = self._forward_decode(fed)
        except Exception as e:
            self._record(e)
            for s in list(self.running):
                self._fail(s, e)
            return
        for i, s in enumerate(self.running):
            s.logits = logits[i]
            self.slot_tokens[s.slot].append(fed[i])
            s.pos += 1

    def _forward_decode(self, fed: list[int]) -> torch.Tensor:
        """One token per running request -> next-token logits [B, V]."""
        rows = self.running
        if not self.compile:
            return self.step.decode(fed, [s.pos for s in rows], [s.slot for s in rows])
        # The compiled step runs the first `width` slots, a power of two (few graphs) that
        # covers every running slot (slots are taken lowest first): one stream runs one row,
        # not max_batch. An idle slot among them feeds a token at the first position past
        # what it holds, which nothing reads.
        width = self.width(max(s.slot for s in rows))
        tokens, start = [0] * width, []
        for held in self.slot_tokens[:width]:
            if len(held) >= self.context:  # no position past it: give up its last one
                del held[-1]
            start.append(len(held))
        for s, token in zip(rows, fed, strict=True):
            tokens[s.slot], start[s.slot] = token, s.pos
        logits = self.step.decode(tokens, start)
        return logits[torch.tensor([s.slot for s in rows], device=self.device)]

    # --- endings -------------------------------------------------------------------------------

    def _release(self, s: _Seq) -> None:
        (self.running if s.prefilled else self.prefilling).remove(s)
        self.free.append(s.slot)

    def _fail(self, s: _Seq, error: Exception | Failure) -> None:
        """End a request with an error; its slot's cache is not trusted any more."""
        if s in self.running or s in self.prefilling:
            self._release(s)
        self.slot_tokens[s.slot] = []
        failure = error if isinstance(error, Failure) else internal(error)
        self._emit_failure(s.req, failure)

    def _emit_failure(self, req: Request, failure: Failure) -> None:
        with self.stats.lock:
            self.stats.failed_requests += 1
        try:
            req.emit("error", failure)
        except Exception:  # the client's side is gone (its event loop closed): nobody to tell
            pass

    def _record(self, e: Exception) -> None:
        traceback.print_exception(e)
        with self.stats.lock:
            self.stats.engine_errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"
