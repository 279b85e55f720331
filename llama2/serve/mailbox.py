"""The engine thread's events, handed to the event loop with one wake-up for all of a step's."""

from __future__ import annotations

import asyncio
import threading


class Mailbox:
    """Puts items on asyncio queues from another thread. A put wakes the queues' event loop only
    when no wake-up is on its way already: the events a decode step puts back to back (one per
    running request) reach their queues in one pass of the loop, rather than each costing the
    engine a write to the loop's self-pipe and the GIL handed to the loop and back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[asyncio.AbstractEventLoop, list] = {}  # put since the loop's wake-up

    def put(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
        """queue.put_nowait(item) on `loop`, soon; RuntimeError if the loop is closed (as
        loop.call_soon_threadsafe raises: the client's side is gone)."""
        if loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self.lock:
            waiting = self.pending.setdefault(loop, [])
            waiting.append((queue, item))
            if len(waiting) > 1:  # (the loop is woken already and takes this one too)
                return
        try:
            loop.call_soon_threadsafe(self._deliver, loop)
        except RuntimeError:  # closed meanwhile
            with self.lock:
                self.pending.pop(loop, None)
            raise

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            items = self.pending.pop(loop, [])
        for queue, item in items:
            queue.put_nowait(item)
