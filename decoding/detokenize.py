"""Incremental detokenisation and stop strings, for streaming text as tokens arrive."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Text added by each token, holding back incomplete UTF-8 characters.

    Decodes a short window (``prefix_offset:``) instead of the whole output, as vLLM does, so the
    cost per token stays constant and byte-level BPE merges across tokens come out right.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a truncated character decodes as U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


class StopStrings:
    """Releases streamed text while watching for stop strings.

    Text that could be the start of a stop string is held back until it is known not to be one;
    when a stop string completes, ``push`` reports it and the text before it is the last released.

    >>> s = StopStrings(["END"])
    >>> s.push("abcE"), s.push("N"), s.push("D tail")
    (('abc', False), ('', False), ('', True))
    """

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.hit: str | None = None  # the stop string that ended the text, once one did

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text to release now, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [(buffer.find(s), s) for s in self._stops if s in buffer]
        if hits:
            at, self.hit = min(hits)
            self._held = ""
            return buffer[:at], True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
