"""One choice's decoding, independent of how its forward passes are batched.

A pass feeds the tokens the model has not seen plus a draft (``draft``); ``walk`` then reads
the pass's logits rows exactly as plain decoding reads its steps — jump-forward, or mask and
pick; accept in the grammar; detokenise and watch stop strings — and goes on to the next row
only while the pick (or every token of forced text) equals a drafted child. The result says
which draft nodes were kept, what was emitted and whether the choice ended; the caller keeps
the kept nodes' key/value rows and feeds the rest next pass. The serial engine
(``decoding.engine``) and the batched one (``decoding.batch_engine``) drive the same walk, so
they decode alike.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from decoding.backend import FinishEvent
from decoding.detokenize import IncrementalDetokenizer, StopStrings
from decoding.draft_tree import child_map, prune_draft
from decoding.grammar import CompiledConstraint, GrammarState
from decoding.sampling import Pick, pick_token
from decoding.speculative import DrafterPool, coupled_sampler
from decoding.types import FinishReason, GenerationRequest, HintStats, TokenEvent, TopLogprob
from spec.draft import Draft
from spec.hint import HintConfig, HintCursor

__all__ = ["FORCED_CHARS_PER_TOKEN", "ChoiceDecoder", "DecoderHost", "WalkResult"]

# Forced text is cut to this many characters per token of budget left before it is tokenised,
# so a long forced string never costs more than the tokens it can still become.
FORCED_CHARS_PER_TOKEN = 16


class DecoderHost(Protocol):
    """What a choice needs from its engine."""

    tokenizer: Any
    stop_ids: list[int]
    drafters: DrafterPool

    @property
    def jump_forward_enabled(self) -> bool: ...

    @property
    def spec_tree(self) -> bool: ...

    @property
    def hint_config(self) -> HintConfig: ...

    def new_grammar_state(self, compiled: CompiledConstraint) -> GrammarState: ...

    def token_text(self, token_id: int) -> str: ...

    def speculation_for(self, request: GenerationRequest) -> str: ...


@dataclass(slots=True)
class WalkResult:
    """What one pass's walk produced: events to send, the draft nodes kept (root to leaf),
    every token appended to the context, and whether the choice ended."""

    events: list[TokenEvent | FinishEvent] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)
    finished: bool = False


class ChoiceDecoder:
    """Choice ``index`` of a prepared request: its context, grammar, sampler and drafts."""

    def __init__(
        self,
        host: DecoderHost,
        request: GenerationRequest,
        prompt_ids: Sequence[int],
        grammar: CompiledConstraint | None,
        max_new_tokens: int,
        index: int,
    ) -> None:
        self.host = host
        self.request = request
        self.index = index
        self.params = params = request.params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            # torch seeds are 64-bit: any integer a caller sends maps into that range.
            self.generator = torch.Generator().manual_seed((seed + index) % 2**63)
        self.grammar = host.new_grammar_state(grammar) if grammar else None
        self.detok = IncrementalDetokenizer(host.tokenizer)
        self.stops = StopStrings(params.stop)
        self.n_top = params.top_logprobs if params.logprobs else 0
        self.n_prompt = len(prompt_ids)
        self.limit = max_new_tokens
        self.context = list(prompt_ids)  # prompt + output: what the model has seen or will
        self.produced = 0
        self.reused = 0  # prompt positions taken from a prefix cache
        self.compute_s = 0.0  # this choice's share of the passes and its own walks
        self.drafting = host.drafters.session(host.speculation_for(request), prompt_ids)
        self.hint: HintCursor | None = None
        if request.draft_hint:
            hint_ids = self._encode(request.draft_hint)
            self.hint = HintCursor(request.draft_hint, hint_ids, host.hint_config)
        self._hinted = 0  # hint tokens in the pass being verified
        self._hint_passes = 0
        self._choose = (
            coupled_sampler(params, self.generator)
            if (self.drafting or self.hint) and self.generator
            else None
        )

    # ---- one pass --------------------------------------------------------------------------

    @property
    def wants_draft(self) -> int:
        """Draft nodes the next pass could use beyond the engine's usual budget: the hint's
        next chunk while the output follows a draft hint, else 0."""
        return self.hint.chunk if self.hint is not None and self.hint.active else 0

    def draft(self, budget: int) -> Draft:
        """A draft after the context (at most ``budget`` nodes, no deeper than the tokens left)
        without the nodes below a stop token or a token the grammar forbids. While the output
        follows a draft hint, the hint is the draft; after it, the drafters'."""
        room = self.limit - self.produced - 1
        self._hinted = 0
        if room <= 0 or budget <= 0:
            return Draft.empty()
        if self.hint is not None and self.hint.active:
            ids = self.hint.propose(self.context[self.n_prompt :], self._decode, self._encode,
                                    budget)  # fmt: skip
            if ids:
                chain = Draft.path(ids, [1.0] * len(ids))
                draft = prune_draft(chain, room, self.host.stop_ids, self.grammar)
                self._hinted = len(draft)
                if draft:
                    return draft
        if self.drafting is None:
            return Draft.empty()
        draft = self.drafting.propose(self.context, budget, self.host.spec_tree)
        return prune_draft(draft, room, self.host.stop_ids, self.grammar)

    def walk(self, rows: torch.Tensor, draft: Draft) -> WalkResult:
        """Read a pass's rows (after the last pending token, then after each draft node)."""
        started = time.perf_counter()
        result = WalkResult()
        children = child_map(draft)
        node = -1  # the walk's position: -1 is the last pending token
        while not result.finished:
            before = len(result.emitted)
            self._row(rows[node + 1], result)
            if result.finished:
                break
            # The row emitted one picked token, or forced grammar text (chosen without looking
            # at the logits): the walk goes on while the draft holds every one of them.
            for token in result.emitted[before:]:
                child = children.get((node, token))
                if child is None:
                    break
                node = child
                result.accepted.append(child)
            else:
                continue
            break
        if not result.finished and self.produced >= self.limit:
            self._finish(result, "length")
        self._record(draft, result)
        self.compute_s += time.perf_counter() - started
        if result.finished:  # the finish event carries this pass's counts and time too
            finish = result.events[-1]
            assert isinstance(finish, FinishEvent)
            spec = self.drafting.counter.stats() if self.drafting else None
            hint = None
            if self.hint is not None:
                hint = HintStats(self.hint.drafted, self.hint.reused, self._hint_passes)
            result.events[-1] = replace(
                finish, spec=spec, cached_tokens=self.reused, compute_s=self.compute_s, hint=hint
            )
        return result

    def _row(self, logits: torch.Tensor, result: WalkResult) -> bool:
        """One plain decoding step on ``logits`` (a picked token, or the grammar's forced text);
        returns whether it emitted forced text."""
        if self.produced >= self.limit:
            self._finish(result, "length")
            return False
        forced = self._jump_forward(self.limit - self.produced)
        steps: list[tuple[int, Pick | None]] = [(t, None) for t in forced]
        if not forced:
            bitmask = self.grammar.fill_bitmask() if self.grammar else None
            pick = pick_token(
                logits, bitmask, self.params, self.generator, self.n_top, self._choose
            )
            if self.drafting and self.drafting.observes:
                self.drafting.observe(self.context, logits)
            if pick.token_id in self.host.stop_ids:
                if self.grammar is not None:
                    self.grammar.accept(pick.token_id)
                self._finish(result, "stop")
                return False
            if self.grammar is not None and not self.grammar.accept(pick.token_id):
                raise RuntimeError(f"grammar rejected allowed token {pick.token_id}")
            steps = [(pick.token_id, pick)]
        for token, pick_or_none in steps:
            self.produced += 1
            self.context.append(token)
            result.emitted.append(token)
            released, hit_stop = self.stops.push(self.detok.push(token))
            result.events.append(self._event(token, released, pick_or_none))
            if hit_stop:
                self._finish(result, "stop", flush=False)
                return bool(forced)
        if self.grammar is not None and self.grammar.is_terminated():
            self._finish(result, "stop")
        return bool(forced)

    def _finish(self, result: WalkResult, reason: FinishReason, flush: bool = True) -> None:
        released, hit = self.stops.push(self.detok.flush()) if flush else ("", True)
        text = released if hit else released + self.stops.flush()
        result.events.append(
            FinishEvent(self.index, reason, text, self.n_prompt, stop_string=self.stops.hit)
        )
        result.finished = True

    def close(self) -> None:
        """Let the drafters learn from this choice's output."""
        if self.drafting is not None:
            self.drafting.close()
            self.drafting = None

    # ---- helpers -----------------------------------------------------------------------------

    def _jump_forward(self, budget: int) -> list[int]:
        """Tokens of the text the grammar forces next, all accepted into the grammar; at most
        ``budget`` of them, from at most ``FORCED_CHARS_PER_TOKEN`` characters per token.

        The last token of the forced text is left to the model, so it can merge the forced
        text's end with what follows as it would without a grammar.
        """
        grammar = self.grammar
        if grammar is None or not self.host.jump_forward_enabled or budget <= 0:
            return []
        text = grammar.jump_forward(max_chars=budget * FORCED_CHARS_PER_TOKEN)
        if not text:
            return []
        ids = self.host.tokenizer.encode(text, add_special_tokens=False)[:-1][:budget]
        accepted: list[int] = []
        for token in ids:
            if not grammar.accept(token):
                break
            accepted.append(token)
        return accepted

    def _record(self, draft: Draft, result: WalkResult) -> None:
        """Count one pass and let the drafters index what it emitted."""
        drafted, accepted = len(draft), len(result.accepted)
        if self._hinted and self.hint is not None:
            self.hint.record(self._hinted, accepted)
            self._hint_passes += 1
            drafted = accepted = 0  # the drafters' counts are for their own drafts
        if self.drafting is not None:
            self.drafting.counter.record(drafted, accepted, len(result.emitted))
            if result.emitted:
                self.drafting.extend(result.emitted)

    def _encode(self, text: str) -> list[int]:
        return list(self.host.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.host.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _event(self, token: int, text: str, pick: Pick | None) -> TokenEvent:
        if pick is None:  # forced by the grammar: certain under the constrained distribution
            return TokenEvent(self.index, token, text, 0.0, 0.0, 1.0, True)
        top = tuple(TopLogprob(t, self.host.token_text(t), lp) for t, lp in pick.top)
        return TokenEvent(
            self.index, token, text, pick.logprob, pick.entropy, pick.allowed_mass, pick.forced, top
        )
