"""Verified escalation: an earlier tier's answer as the draft the next tier verifies.

When a cascade escalates, the small model's output is usually close to what the large model
would write (the same call with one argument changed, the same sentence with one word). The
large model verifies that text as a speculative draft: one pass scores many of its tokens, the
longest prefix it would have produced itself is kept, and it generates on from there. The
output is exactly the large model's own (greedy: token-identical; sampling: distributed as its
own output, since the draft is fixed before the verifier's noise is drawn — see
``decoding.speculative``); what the hint changes is how many passes it takes.

This module is pure: where the output stands against the hint (token prefix first, then text,
since the two tiers may tokenise differently), what to propose next, and how big a chunk to
verify in one pass (it grows while whole chunks are accepted, so a hint the large model
rejects early costs one small pass, and one it agrees with is verified in a few large ones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["HintConfig", "HintCursor", "hint_continuation"]

Encode = Callable[[str], list[int]]
Decode = Callable[[Sequence[int]], str]


def hint_continuation(
    output_ids: Sequence[int],
    hint_ids: Sequence[int],
    hint_text: str,
    decode: Decode,
    encode: Encode,
) -> list[int] | None:
    """The hint's tokens after what was output so far, or None once the output left the hint.

    Token alignment first (the output's ids are a prefix of the hint's); failing that, text
    alignment (the output's text is a prefix of the hint's text, and the rest is tokenised
    afresh), which covers forced grammar text and tokenisers that split the same text
    differently.

    >>> enc = lambda s: [ord(c) for c in s]
    >>> dec = lambda ids: "".join("h" if i == 999 else chr(i) for i in ids)
    >>> hint_continuation([104], [104, 105], "hi", dec, enc)
    [105]
    >>> hint_continuation([72], [104, 105], "hi", dec, enc) is None
    True
    >>> hint_continuation([999], [104, 105], "hi", dec, enc)  # other ids, same text
    [105]
    """
    n = len(output_ids)
    if n <= len(hint_ids) and list(hint_ids[:n]) == list(output_ids):
        return list(hint_ids[n:])
    output_text = decode(output_ids)
    if hint_text.startswith(output_text):
        rest = hint_text[len(output_text) :]
        return encode(rest) if rest else []
    return None


@dataclass(frozen=True, slots=True)
class HintConfig:
    """``first_chunk``: hint tokens verified in the first pass; each pass whose chunk was all
    accepted doubles the next one, up to ``max_chunk``."""

    first_chunk: int = 32
    max_chunk: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.first_chunk <= self.max_chunk:
            raise ValueError("need 1 <= first_chunk <= max_chunk")


@dataclass(slots=True)
class HintCursor:
    """One choice's progress through a hint: what to propose next and what was reused.

    ``reused`` counts hint tokens the verifier accepted (tokens the output took from the earlier
    tier); ``drafted`` counts hint tokens offered for verification.
    """

    hint_text: str
    hint_ids: list[int]
    config: HintConfig = field(default_factory=HintConfig)
    active: bool = True
    chunk: int = 0
    reused: int = 0
    drafted: int = 0

    def __post_init__(self) -> None:
        self.chunk = self.config.first_chunk
        self.active = bool(self.hint_ids)

    def propose(
        self, output_ids: Sequence[int], decode: Decode, encode: Encode, budget: int
    ) -> list[int]:
        """The next chunk of the hint after ``output_ids`` (at most ``budget`` tokens); empty,
        and the cursor inactive for good, once the output has left the hint or used it up."""
        if not self.active or budget <= 0:
            return []
        rest = hint_continuation(output_ids, self.hint_ids, self.hint_text, decode, encode)
        if not rest:
            self.active = False
            return []
        n = len(output_ids)
        if self.hint_ids[n:] != rest:  # realigned on text: the rest in this model's tokens
            self.hint_ids = [*output_ids, *rest]
        return rest[: min(self.chunk, budget)]

    def record(self, drafted: int, accepted: int) -> None:
        """A pass verified ``drafted`` hint tokens (after grammar pruning) and kept ``accepted``.
        A chunk kept whole doubles the next; a partly kept one (the output left the hint, or
        forced grammar text ended the walk) starts again small, and the next ``propose`` tells
        which of the two it was."""
        if not drafted:
            return
        self.drafted += drafted
        self.reused += accepted
        if accepted >= drafted:
            self.chunk = min(self.chunk * 2, self.config.max_chunk)
        else:
            self.chunk = self.config.first_chunk
