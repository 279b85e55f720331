"""Generated token ids -> text pieces for one sequence: a piece never ends inside a UTF-8
character, stop strings are cut (and text that may begin one is held back), and the pieces
concatenate to the final text."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer


class TextStream:
    """Generated ids -> text pieces, for one row."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), continuation: bool = True):
        self.tokenizer, self.stop, self.continuation = tokenizer, tuple(stop), continuation
        self.ids: list[int] = []
        self.text = ""  # decoded text of ids[:decoded]
        self.decoded = 0
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found; self.text ends before it

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        pending = self.tokenizer.decode(
            self.ids[self.decoded :], continuation=self.continuation or self.decoded > 0
        )
        if pending.endswith("\ufffd"):  # maybe the first bytes of a character: wait for the rest
            return ""
        self.text += pending
        self.decoded = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text (including bytes that never formed a character)."""
        if not self.stopped and self.decoded < len(self.ids):
            tail = self.ids[self.decoded :]
            self.text += self.tokenizer.decode(
                tail, continuation=self.continuation or self.decoded > 0
            )
            self.decoded = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop:
            lo = max(0, self.emitted - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of a stop string."""
        for n in range(min(len(self.text), max(map(len, self.stop), default=0)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) and s != tail for s in self.stop):
                return n
        return 0
