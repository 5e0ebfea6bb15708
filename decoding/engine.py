"""The embedded engine: a Hugging Face causal LM in torch, one readable decode loop per choice.

Loop per step: ask the grammar for forced text (jump-forward) → else mask the logits, pick a
token → accept it in the grammar → detokenise and watch stop strings → one forward pass with
the KV cache. Generation runs on one worker thread per model, so concurrent callers queue
instead of sharing a cache; each request owns its own cache, generator and grammar matcher.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from decoding.backend import BackendInfo, FinishEvent
from decoding.chat_template import render_prompt
from decoding.constraint import ToolCalls
from decoding.detokenize import IncrementalDetokenizer, StopStrings
from decoding.grammar import CompiledConstraint, GrammarCompiler, GrammarState
from decoding.loader import LoadedModel
from decoding.sampling import Pick, pick_token
from decoding.types import (
    Choice,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
    TopLogprob,
)
from schemas.errors import ContextLengthError, GenerationCancelled

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    name: str
    tier: str = "slm"
    jump_forward: bool = True
    warmup: bool = True
    grammar_cache_size: int = 256
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0

    def __post_init__(self) -> None:
        if self.grammar_cache_size < 1:
            raise ValueError("grammar_cache_size must be >= 1")


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """Everything checked and computed before the first token (errors surface here, as 400s)."""

    request: GenerationRequest
    prompt_ids: list[int]
    grammar: CompiledConstraint | None
    max_new_tokens: int


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the generation config's EOS ids plus the tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


class EmbeddedEngine:
    """A local model behind the ``Backend`` interface."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.grammars = GrammarCompiler.for_hf_tokenizer(
            self.tokenizer, self.vocab_size, self.stop_ids, cache_size=config.grammar_cache_size
        )
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.info = BackendInfo(
            name=config.name,
            tier=config.tier,
            model=loaded.source,
            context_length=self.context_length,
            supports_logprobs=True,
            supports_grammar=True,
            device=str(self.model.device),
            dtype=str(self.model.dtype).removeprefix("torch."),
            price_in_per_mtok=config.price_in_per_mtok,
            price_out_per_mtok=config.price_out_per_mtok,
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{config.name}")
        self._token_text: dict[int, str] = {}
        self.ready = False
        if config.warmup:
            self.warmup()
        self.ready = True

    # ---- public API -------------------------------------------------------------------------

    def warmup(self) -> None:
        """Run a few forward passes: the first ones after a load are 5–15x slower on these VMs."""
        started = time.perf_counter()
        ids = self.tokenizer.encode("Hello, warm up the kernels please.", add_special_tokens=False)
        with torch.inference_mode():
            for _ in range(3):
                cache = DynamicCache()
                self._forward(ids, cache)
                for token in ids[:4]:
                    self._forward([token], cache)
        log.info("%s warmed up in %.1f s", self.config.name, time.perf_counter() - started)

    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Render the prompt, check the length, compile the grammar. Raises 400-class errors."""
        prompt_ids = render_prompt(self.tokenizer, list(req.messages), list(req.tools))
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your messages resulted in {len(prompt_ids)} tokens.",
                param="messages",
            )
        max_tokens = req.params.max_tokens
        if max_tokens is not None and max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. However, "
                f"you requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                param="max_tokens",
            )
        param = "tools" if isinstance(req.constraint, ToolCalls) else "response_format"
        grammar = self.grammars.compile(req.constraint, param=param)
        return PreparedRequest(req, prompt_ids, grammar, max_tokens or room)

    def generate_sync(
        self,
        req: GenerationRequest,
        cancel: threading.Event | None = None,
        prepared: PreparedRequest | None = None,
    ) -> Iterator[TokenEvent | FinishEvent]:
        """Generate on the calling thread (tests, benchmarks); see ``generate`` for servers."""
        cancel = cancel or threading.Event()
        prepared = prepared or self.prepare(req)
        for index in range(req.params.n):
            yield from self._decode_choice(prepared, index, cancel)

    async def generate(
        self, req: GenerationRequest, prepared: PreparedRequest | None = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Stream events from the worker thread. Closing the iterator cancels generation.

        ``prepared`` is what ``prepare(req)`` returned, when the caller already checked the
        request before sending anything (the gateway does), so the work is not repeated."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def run() -> None:
            try:
                for event in self.generate_sync(req, cancel, prepared):
                    loop.call_soon_threadsafe(events.put_nowait, event)
            except BaseException as exc:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(events.put_nowait, exc)
            loop.call_soon_threadsafe(events.put_nowait, done)

        future = loop.run_in_executor(self._worker, run)
        try:
            while True:
                item = await events.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            if not future.done():
                # Let the worker notice the flag at its next step; never block the event loop.
                future.add_done_callback(lambda f: f.exception())

    async def complete(
        self, req: GenerationRequest, prepared: PreparedRequest | None = None
    ) -> GenerationResult:
        events = [e async for e in self.generate(req, prepared)]
        return self._collect(req, events)

    def complete_sync(self, req: GenerationRequest) -> GenerationResult:
        return self._collect(req, list(self.generate_sync(req)))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ---- the decode loop -------------------------------------------------------------------

    def _decode_choice(
        self, prepared: PreparedRequest, index: int, cancel: threading.Event
    ) -> Iterator[TokenEvent | FinishEvent]:
        params = prepared.request.params
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator = torch.Generator().manual_seed(seed + index)
        grammar = self.grammars.new_state(prepared.grammar) if prepared.grammar else None
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStrings(params.stop)
        n_top = params.top_logprobs if params.logprobs else 0
        cache = DynamicCache()
        produced = 0
        n_prompt = len(prepared.prompt_ids)

        with torch.inference_mode():
            logits = self._forward(prepared.prompt_ids, cache)
            while True:
                if cancel.is_set():
                    raise GenerationCancelled("generation cancelled: the client went away")
                if produced >= prepared.max_new_tokens:
                    yield FinishEvent(index, "length", _final_text(detok, stops), n_prompt)
                    return
                forced = self._jump_forward(grammar, prepared.max_new_tokens - produced)
                steps: list[tuple[int, Pick | None]]
                if forced:
                    steps = [(t, None) for t in forced]
                else:
                    bitmask = grammar.fill_bitmask() if grammar else None
                    pick = pick_token(logits, bitmask, params, generator, n_top)
                    if pick.token_id in self.stop_ids:
                        if grammar is not None:
                            grammar.accept(pick.token_id)
                        yield FinishEvent(index, "stop", _final_text(detok, stops), n_prompt)
                        return
                    if grammar is not None and not grammar.accept(pick.token_id):
                        raise RuntimeError(f"grammar rejected allowed token {pick.token_id}")
                    steps = [(pick.token_id, pick)]
                for token, step_pick in steps:
                    produced += 1
                    released, hit_stop = stops.push(detok.push(token))
                    yield self._event(index, token, released, step_pick)
                    if hit_stop:
                        yield FinishEvent(index, "stop", "", n_prompt)
                        return
                if grammar is not None and grammar.is_terminated():
                    yield FinishEvent(index, "stop", _final_text(detok, stops), n_prompt)
                    return
                logits = self._forward([t for t, _ in steps], cache)

    def _jump_forward(self, grammar: GrammarState | None, budget: int) -> list[int]:
        """Tokens of the text the grammar forces next, all accepted into ``grammar``.

        The last token of the forced text is left to the model, so it can merge the forced
        text's end with what follows as it would without a grammar.
        """
        if grammar is None or not self.config.jump_forward:
            return []
        text = grammar.jump_forward()
        if not text:
            return []
        ids = self.tokenizer.encode(text, add_special_tokens=False)[:-1][:budget]
        accepted: list[int] = []
        for token in ids:
            if not grammar.accept(token):
                break
            accepted.append(token)
        return accepted

    def _forward(self, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        """Run ``ids`` through the model with ``cache``; logits of the last position (float32)."""
        out = self.model(
            input_ids=torch.tensor([ids], device=self.model.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[0, -1].float()
        return logits

    def _event(self, index: int, token: int, text: str, pick: Pick | None) -> TokenEvent:
        if pick is None:  # forced by the grammar: certain under the constrained distribution
            return TokenEvent(index, token, text, 0.0, 0.0, 1.0, True)
        top = tuple(TopLogprob(t, self.token_text(t), lp) for t, lp in pick.top)
        return TokenEvent(
            index, token, text, pick.logprob, pick.entropy, pick.allowed_mass, pick.forced, top
        )

    def token_text(self, token_id: int) -> str:
        """One token's own text (for logprobs output)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode([token_id]))
            self._token_text[token_id] = text
        return text

    def _collect(self, req: GenerationRequest, events: list[Any]) -> GenerationResult:
        by_index: dict[int, Choice] = {}
        for event in events:
            choice = by_index.setdefault(event.index, Choice(event.index, "", [], [], "stop"))
            choice.text += event.text
            if isinstance(event, FinishEvent):
                choice.finish_reason = event.reason
            else:
                choice.token_ids.append(event.token_id)
                choice.events.append(event)
        prompt_tokens = next((e.prompt_tokens for e in events if isinstance(e, FinishEvent)), 0)
        return GenerationResult(
            [by_index[i] for i in sorted(by_index)], prompt_tokens, self.config.name
        )


def _final_text(detok: IncrementalDetokenizer, stops: StopStrings) -> str:
    """Release what the detokeniser and the stop-string watcher still hold at the end."""
    released, hit = stops.push(detok.flush())
    return released if hit else released + stops.flush()
