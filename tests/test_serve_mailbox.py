"""The engine thread's events reach the event loop's queues in order, with one wake-up of the loop
for all the events put before it runs, and a closed loop refuses them."""

import asyncio
import threading

import pytest

from llama2.serve.mailbox import Mailbox


def test_one_wake_up_for_the_events_put_before_the_loop_runs():
    loop = asyncio.new_event_loop()
    wakes = []
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(*args):
        wakes.append(args)
        return call_soon_threadsafe(*args)

    loop.call_soon_threadsafe = counted
    box = Mailbox()
    queues = [asyncio.Queue() for _ in range(3)]
    try:

        def step(n: int) -> None:  # a decode step's events, from the engine's thread
            for row, q in enumerate(queues):
                box.put(loop, q, (n, row))

        thread = threading.Thread(target=step, args=(0,))
        thread.start()
        thread.join()
        assert len(wakes) == 1  # (the loop has not run: the later puts rode on the first)
        loop.run_until_complete(asyncio.sleep(0))
        assert [q.get_nowait() for q in queues] == [(0, 0), (0, 1), (0, 2)]
        assert all(q.empty() for q in queues) and not box.pending

        for n in (1, 2):  # the next steps: a wake-up each, their events in order
            step(n)
            step(n + 10)
            loop.run_until_complete(asyncio.sleep(0))
        assert len(wakes) == 3
        for row, q in enumerate(queues):
            assert [q.get_nowait() for _ in range(4)] == [(1, row), (11, row), (2, row), (12, row)]
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        box.put(loop, queues[0], "late")
    assert not box.pending


def test_events_reach_a_running_loop_from_another_thread():
    async def main():
        loop, box, queue = asyncio.get_running_loop(), Mailbox(), asyncio.Queue()
        sender = threading.Thread(target=lambda: [box.put(loop, queue, i) for i in range(500)])
        sender.start()
        got = [await asyncio.wait_for(queue.get(), 10) for _ in range(500)]
        sender.join()
        return got

    assert asyncio.run(main()) == list(range(500))
