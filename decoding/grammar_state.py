"""What every grammar engine gives the decode loop: a compiled constraint and a per-request
state with one interface (mask, accept, validate drafts, roll back, jump-forward, end).

The engines (``decoding.xgrammar_engine``, ``decoding.llguidance_engine``) both write the same
packed int32 bitmask (32 tokens per word, a set bit = allowed), so ``decoding.sampling`` applies
either without knowing which one made it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from decoding.constraint import GRAMMAR_ENGINES, GrammarEngine

__all__ = ["GRAMMAR_ENGINES", "CompiledConstraint", "EngineName", "GrammarEngine", "GrammarState"]

# Rejected speculative drafts are rolled back through the matcher; this bounds how far.
MAX_ROLLBACK_TOKENS = 64

EngineName = Literal["xgrammar", "llguidance", "outlines-regex"]


class GrammarState(Protocol):
    """Per-request matcher. Every method is cheap except ``fill_bitmask``."""

    can_jump_forward: bool

    def fill_bitmask(self) -> torch.Tensor:
        """Fill and return the packed bitmask ([1, ceil(vocab/32)] int32) of tokens allowed
        next."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (state unchanged or dead) when it is not allowed."""
        ...

    def validate_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens of ``token_ids`` the grammar accepts; the state is
        unchanged."""
        ...

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens (at most ``MAX_ROLLBACK_TOKENS``)."""
        ...

    def jump_forward(self, max_chars: int | None = None) -> str:
        """Text the grammar forces next ('' when the next character is not fixed), at most
        ``max_chars`` of it."""
        ...

    def is_terminated(self) -> bool:
        """Whether the output is complete: nothing more may follow."""
        ...


@dataclass(frozen=True, slots=True)
class CompiledConstraint:
    """A compiled grammar plus what is needed to decode with it and check its output.

    ``engine``: which engine compiled it (reported in the ``slmgate`` object and the ledger).
    ``new_state(vocab_size)`` builds a per-request matcher. ``complete``: the grammar enforces
    every keyword of the schema, so a finished, untruncated output is valid by construction;
    when False some keywords are checked only after generation (``decoding.validate``).
    ``jump_forward`` is False for a recursive schema whose recursive part forces long text:
    that text can repeat once per nesting level the model opened, so it is left to the
    per-token mask, which the token budget bounds. ``memory_bytes`` counts against the cache's
    byte budget."""

    engine: EngineName
    new_state: Callable[[int], GrammarState]
    schema: Any  # the JSON schema to validate output against (None for regex / tool calls)
    memory_bytes: int
    complete: bool = True
    jump_forward: bool = True
    fallback_from: str = ""  # why the preferred engine did not compile it ('' when it did)
