"""The embedded engine: a Hugging Face causal LM in torch, one readable decode loop per choice.

Loop per step: ask the grammar for forced text (jump-forward) → else mask the logits, pick a
token → accept it in the grammar → detokenise and watch stop strings → one forward pass with
the KV cache. With speculation, a pass also carries a model-free draft tree (pruned where the
grammar forbids it; a branching tree is fed with a tree attention mask) and yields one logits
row per node; the same steps then walk from the root to the child whose token the model picks,
and the cache keeps only that branch, so the output is the plain loop's
(``decoding.speculative``). Prompts are prefilled in position-aligned blocks that a prefix
cache reuses across requests (``decoding.prefix_cache``). Each choice's decoding state
(grammar matcher, generator, detokeniser, drafts) is a ``decoding.choice.ChoiceDecoder``; the
drafters are shared and learn from every request's output.

Two ways to run the passes: with ``batching`` (the default for configured models) one loop
thread runs one forward pass per step over every running sequence, their key/value rows in a
shared block pool (``decoding.batch_engine``); without it, one worker thread decodes one
request at a time with its own cache (the serial engine, the reference for exactness tests).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import DynamicCache

from decoding.backend import BackendInfo, FinishEvent, collect
from decoding.batch_engine import BatchConfig, BatchLoop
from decoding.chat_template import render_prompt
from decoding.choice import ChoiceDecoder
from decoding.constraint import ToolCalls
from decoding.draft_tree import keep_accepted_rows
from decoding.grammar import (
    CompiledConstraint,
    GrammarCompiler,
    GrammarState,
    shared_grammar_cache,
)
from decoding.grammar_compile import GrammarLimits
from decoding.grammar_state import GrammarEngine
from decoding.loader import LoadedModel
from decoding.prefix_cache import PrefixCache
from decoding.speculative import DrafterPool
from decoding.types import (
    GenerationRequest,
    GenerationResult,
    TokenEvent,
)
from kernels.tree_mask import additive_mask, build_tree_mask
from schemas.errors import ContextLengthError, GenerationCancelled, InvalidRequestError
from spec.draft import Draft
from spec.hint import HintConfig
from spec.stand import StandConfig
from spec.suffix import SuffixConfig

log = logging.getLogger(__name__)


SPECULATION_MODES = ("auto", "none", "suffix", "stand", "both")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How one embedded model decodes.

    Speculation (model-free drafts verified losslessly; see ``decoding.speculative``):
    ``speculation`` is the default for requests that do not set one: ``none``, ``suffix``
    (SuffixDecoding over the prompt and recent outputs), ``stand`` (STAND n-gram
    distributions), ``both`` (both trees merged into one), or ``auto``:
    ``SPECULATION_AUTO`` by the model's dtype. Measured on this CPU (BENCHMARKS.md,
    "Speculation", tau-bench replay with full prompts, SmolLM2-135M): in float32 a 16-token
    pass at a 5k context costs ~1.9x a 1-token pass, greedy output is token-identical and
    ``suffix`` decodes 4.8x faster (2.2x whole requests, prefill included), so ``auto``
    speculates. In bfloat16 it is about as fast, but a k-token pass rounds
    differently from k one-token passes and 30% of the outputs drifted from plain decoding,
    so ``auto`` keeps bf16 exact (``none``); the verify dtype is the model's dtype, and a
    route that prefers speed sets ``speculation`` explicitly. ``spec_max_draft`` bounds the
    tokens drafted per pass; with ``spec_tree`` a pass verifies the drafters' token trees (one
    forward pass with a tree attention mask, ``kernels.tree_mask``), else their best path;
    ``suffix``/``stand`` configure the drafters. ``hint`` sizes the passes that verify a
    request's ``draft_hint`` (an earlier tier's answer, ``spec.hint``); hints are verified
    whatever ``speculation`` says, since they are what the request asked to reuse.

    Prompts are prefilled in ``prefill_block``-token blocks aligned to absolute positions, and
    the rows of up to ``prefix_cache_tokens`` recent prompt tokens are kept so a request that
    shares whole blocks with an earlier prompt (an agent's next turn) prefills only the rest
    (``decoding.prefix_cache``; exact: a hit yields the tensors a miss computes); 0 disables it.

    ``model`` is the model's name reported in ``BackendInfo.model`` (never a local path; the
    engine's ``name`` when empty). ``max_prompt_tokens`` caps the prompt (None: the context
    length); a longer one is a ``ContextLengthError``, so a cascade moves to its next tier.
    ``grammar_limits`` bound grammar compiles, their cache and the schemas accepted.
    """

    name: str
    tier: str = "slm"
    model: str = ""
    jump_forward: bool = True
    warmup: bool = True
    max_prompt_tokens: int | None = None
    grammar_limits: GrammarLimits = field(default_factory=GrammarLimits)
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    compute_price_per_hour: float | None = None  # None: priced per token (BackendInfo)
    speculation: str = "auto"
    spec_max_draft: int = 16
    spec_tree: bool = True
    prefill_block: int = 256
    prefix_cache_tokens: int = 32768
    suffix: SuffixConfig = field(default_factory=SuffixConfig)
    stand: StandConfig = field(default_factory=StandConfig)
    hint: HintConfig = field(default_factory=HintConfig)
    grammar_engine: GrammarEngine = "auto"  # for requests that name none
    batching: bool = False
    batch: BatchConfig = field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be >= 1 (or None for the context length)")
        if self.speculation not in SPECULATION_MODES:
            raise ValueError(f"speculation must be one of {SPECULATION_MODES}")
        if self.spec_max_draft < 0:
            raise ValueError("spec_max_draft must be >= 0")
        if self.prefill_block < 1:
            raise ValueError("prefill_block must be >= 1")
        if self.prefix_cache_tokens < 0:
            raise ValueError("prefix_cache_tokens must be >= 0")


# ``speculation="auto"`` by model dtype; other dtypes (float16) as bfloat16.
SPECULATION_AUTO = {"float32": "suffix", "bfloat16": "none"}


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

    # Requests may carry ``continue_ids`` (the router's abstention probe relies on it) and a
    # ``draft_hint`` (verified escalation).
    supports_continuation = True
    supports_draft_hint = True

    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        # out_features, not weight.shape: a quantised head (decoding.quant) has no float weight.
        self.vocab_size = int(self.model.get_output_embeddings().out_features)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.grammars = GrammarCompiler.for_hf_tokenizer(
            self.tokenizer, self.vocab_size, self.stop_ids, limits=config.grammar_limits,
            cache=shared_grammar_cache(config.grammar_limits), default_engine=config.grammar_engine,
        )  # fmt: skip
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.info = BackendInfo(
            name=config.name,
            tier=config.tier,
            model=config.model or config.name,
            context_length=self.context_length,
            supports_logprobs=True,
            supports_grammar=True,
            device=str(self.model.device),
            dtype=str(self.model.dtype).removeprefix("torch."),
            price_in_per_mtok=config.price_in_per_mtok,
            price_out_per_mtok=config.price_out_per_mtok,
            compute_price_per_hour=config.compute_price_per_hour,
            compute_cores=torch.get_num_threads(),
        )
        self.drafters = DrafterPool(config.suffix, config.stand)
        self.prefix_cache = (  # the serial path's; the batch loop shares blocks instead
            PrefixCache(config.prefill_block, config.prefix_cache_tokens)
            if config.prefix_cache_tokens and not config.batching
            else None
        )
        self.default_speculation = (
            config.speculation
            if config.speculation != "auto"
            else SPECULATION_AUTO.get(self.info.dtype, "none")
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{config.name}")
        self._token_text: dict[int, str] = {}
        self.ready = False
        if config.warmup:
            self.warmup()
        self.batch = BatchLoop(self, config.batch) if config.batching else None
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
        """Render the prompt, check the length, compile the grammar. Raises 400-class errors
        (the grammar's within ``grammar_limits.compile_timeout_s``)."""
        prompt_ids, max_new_tokens = self._check_prompt(req)
        grammar = (
            self.grammars.compile(req.constraint, _grammar_param(req), req.grammar_engine)
            if req.guided
            else None
        )
        return PreparedRequest(req, prompt_ids, grammar, max_new_tokens)

    async def prepare_async(self, req: GenerationRequest) -> PreparedRequest:
        """``prepare`` for the event loop: the prompt is rendered on a worker thread and the
        grammar compile is awaited without holding a thread while it runs."""
        prompt_ids, max_new_tokens = await asyncio.to_thread(self._check_prompt, req)
        grammar = None
        if req.guided:
            grammar = await self.grammars.compile_async(
                req.constraint, _grammar_param(req), req.grammar_engine
            )
        return PreparedRequest(req, prompt_ids, grammar, max_new_tokens)

    def _check_prompt(self, req: GenerationRequest) -> tuple[list[int], int]:
        """The prompt's token ids and the most tokens it leaves room for, or a 400."""
        prompt_ids = render_prompt(self.tokenizer, list(req.messages), list(req.tools))
        prompt_ids += req.continue_ids
        if req.continue_text:
            prompt_ids += self.tokenizer.encode(req.continue_text, add_special_tokens=False)
        cap = self.config.max_prompt_tokens
        if cap is not None and len(prompt_ids) > cap:
            raise ContextLengthError(
                f"This model takes prompts of at most {cap} tokens (limits.max_prompt_tokens). "
                f"However, your messages resulted in {len(prompt_ids)} tokens.",
                param="messages",
            )
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your messages resulted in {len(prompt_ids)} tokens.",
                param="messages",
            )
        if self.batch is not None:  # one sequence must fit in the batch's key/value memory
            memory = self.batch.capacity
            if len(prompt_ids) + (req.params.max_tokens or 1) > memory:
                raise ContextLengthError(
                    f"This model's key/value memory holds {memory} tokens (kv_cache_mb). "
                    f"However, your request needs {len(prompt_ids)} in the messages plus "
                    f"{req.params.max_tokens or 1} in the completion.",
                    param="messages" if len(prompt_ids) >= memory else "max_tokens",
                )
            room = min(room, memory - len(prompt_ids))
        max_tokens = req.params.max_tokens
        if max_tokens is not None and max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. However, "
                f"you requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                param="max_tokens",
            )
        try:
            self.drafters.names(self.speculation_for(req))
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="speculation") from None
        if max_tokens is not None:
            return prompt_ids, max_tokens
        budget = req.params.token_budget  # no max_tokens: the request's budget split per choice
        return prompt_ids, room if budget is None else max(1, min(room, budget // req.params.n))

    def generate_sync(
        self,
        req: GenerationRequest,
        cancel: threading.Event | None = None,
        prepared: PreparedRequest | None = None,
    ) -> Iterator[TokenEvent | FinishEvent]:
        """Generate on the calling thread (tests, benchmarks; with batching the batch loop
        decodes and this thread waits for its events); see ``generate`` for servers."""
        cancel = cancel or threading.Event()
        prepared = prepared or self.prepare(req)
        if self.batch is not None:
            yield from self._batched_sync(prepared, cancel)
            return
        for index in range(req.params.n):
            yield from timed_choice(self._decode_choice(prepared, index, cancel))

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
        if self.batch is not None:
            prepared = prepared or await self.prepare_async(req)

            def sink(event: Any) -> None:
                loop.call_soon_threadsafe(events.put_nowait, event)

            self.batch.submit(prepared, cancel, sink)
            try:
                while (item := await events.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                cancel.set()
            return

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
        if self.batch is not None:
            self.batch.close()

    def _batched_sync(
        self, prepared: PreparedRequest, cancel: threading.Event
    ) -> Iterator[TokenEvent | FinishEvent]:
        """``prepared``'s events from the batch loop, waited for on this thread."""
        assert self.batch is not None
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.batch.submit(prepared, cancel, events.put)
        try:
            while (item := events.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    # ---- the decode loop -------------------------------------------------------------------

    def _decode_choice(
        self, prepared: PreparedRequest, index: int, cancel: threading.Event
    ) -> Iterator[TokenEvent | FinishEvent]:
        """Decode one choice: draft → forward the tokens not yet cached plus the draft → walk
        the rows (``ChoiceDecoder.walk``) → keep the accepted rows, feed the rest next pass."""
        decoder = self.decoder(prepared, index)
        try:
            with torch.inference_mode():
                cache, decoder.reused, prefilled = self._prefill(prepared.prompt_ids, cancel)
                pending = decoder.context[prefilled:]  # the context's tail not yet cached
                while True:
                    if cancel.is_set():
                        raise GenerationCancelled("generation cancelled: the client went away")
                    draft = decoder.draft(max(self.config.spec_max_draft, decoder.wants_draft))
                    cached = len(decoder.context) - len(pending)
                    rows = self._forward(pending + list(draft.token_ids), cache, draft, cached)
                    step = decoder.walk(rows, draft)
                    yield from step.events
                    if step.finished:
                        return
                    keep_accepted_rows(cache, cached + len(pending), step.accepted)
                    pending = step.emitted[len(step.accepted) :]
        finally:
            decoder.close()

    def decoder(self, prepared: PreparedRequest, index: int) -> ChoiceDecoder:
        """Choice ``index`` of ``prepared``'s decoding state."""
        return ChoiceDecoder(
            self, prepared.request, prepared.prompt_ids, prepared.grammar,
            prepared.max_new_tokens, index,
        )  # fmt: skip

    def new_grammar_state(self, compiled: CompiledConstraint) -> GrammarState:
        return self.grammars.new_state(compiled)

    @property
    def jump_forward_enabled(self) -> bool:
        return self.config.jump_forward

    @property
    def spec_tree(self) -> bool:
        return self.config.spec_tree

    @property
    def hint_config(self) -> HintConfig:
        return self.config.hint

    def speculation_for(self, request: GenerationRequest) -> str:
        """The request's ``speculation`` setting, or the engine's default for this dtype."""
        return request.speculation or self.default_speculation

    def _prefill(
        self, prompt_ids: list[int], cancel: threading.Event
    ) -> tuple[DynamicCache, int, int]:
        """Cache the prompt's whole blocks but the last token's (stored ones are reused, new
        ones stored); the rest is fed by the first decoding pass. Returns the cache, how many
        positions came from the prefix cache and how many it holds."""
        block = self.config.prefill_block
        start, cache = (
            self.prefix_cache.lookup(prompt_ids) if self.prefix_cache else (0, DynamicCache())
        )
        end = (max(len(prompt_ids) - 1, 0) // block) * block
        for offset in range(start, end, block):
            if cancel.is_set():
                raise GenerationCancelled("generation cancelled: the client went away")
            self._forward(prompt_ids[offset : offset + block], cache)
        if self.prefix_cache is not None and end > start:
            self.prefix_cache.store(prompt_ids, cache)
        return cache, start, end

    def _forward(
        self,
        ids: list[int],
        cache: DynamicCache,
        draft: Draft | None = None,
        cached: int = 0,
    ) -> torch.Tensor:
        """Run ``ids`` (pending tokens, then ``draft``'s nodes) through the model with ``cache``
        (holding ``cached`` positions). Returns the logits after the last pending token and
        after every draft node (``[1 + len(draft), vocab]``, float32). A branching draft is fed
        with a tree attention mask and tree positions, so each node sees only its ancestors."""
        n_draft = len(draft) if draft is not None else 0
        keep = n_draft + 1
        inputs = torch.tensor([ids], device=self.model.device)
        extra: dict[str, torch.Tensor] = {}
        if draft is not None and not draft.is_path():
            mask, positions = build_tree_mask(
                draft.parents, cached, len(ids) - n_draft, self.model.device
            )
            extra = {
                "attention_mask": additive_mask(mask, self.model.dtype),
                "position_ids": positions[None],
            }
        out = self.model(
            input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=keep, **extra
        )
        logits: torch.Tensor = out.logits[0, -keep:].float()
        return logits

    def token_text(self, token_id: int) -> str:
        """One token's own text (for logprobs output)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode([token_id]))
            self._token_text[token_id] = text
        return text

    def _collect(self, req: GenerationRequest, events: list[Any]) -> GenerationResult:
        return collect(events, self.config.name)


def timed_choice(
    events: Iterator[TokenEvent | FinishEvent],
) -> Iterator[TokenEvent | FinishEvent]:
    """One choice's events, its ``FinishEvent`` carrying the seconds spent producing them
    (prefill + decode): time suspended at a yield, waiting on the consumer, is not counted."""
    spent = 0.0
    try:
        while True:
            started = time.perf_counter()
            try:
                event = next(events)
            except StopIteration:
                return
            spent += time.perf_counter() - started
            if isinstance(event, FinishEvent):
                event = replace(event, compute_s=spent)
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # a cancelled consumer still runs the choice's cleanup


def _grammar_param(req: GenerationRequest) -> str:
    """The request field a grammar error points at."""
    return "tools" if isinstance(req.constraint, ToolCalls) else "response_format"
