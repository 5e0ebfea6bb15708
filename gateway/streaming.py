"""Server-sent events for one request, and waiting on work while the client may go away.

A stream runs in a task of its own (``_pump``) that feeds a queue, so its deadline and its
cancellation apply to that task whichever task sends the response. The handler waits for the first
chunk before answering: a failure before the first byte keeps its HTTP status, and the headers can
name the tier, since by then a cascade has committed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from decoding.backend import FinishEvent
from decoding.types import GenerationRequest
from gateway.render import (
    call_id,
    headers_of,
    logprobs_of,
    message_of,
    slmgate_facts,
    sse,
    wire_finish_reason,
)
from gateway.state import Gateway
from router.router import Answer, Plan, Router, Trace
from schemas.chat import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChoiceDelta,
    DeltaFunctionCall,
    DeltaToolCall,
    PromptTokensDetails,
    Usage,
)
from schemas.errors import (
    GenerationCancelled,
    RequestTimeoutError,
    SlmgateError,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it if the client goes away first, or if this waiter is itself
    cancelled (a deadline): the work then stops at its next step and books what it consumed
    before the caller records the request, instead of generating on unseen."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                await _cancel_and_wait(task)
                raise GenerationCancelled("the client disconnected")
        return await task
    except BaseException:
        await _cancel_and_wait(task)
        raise


async def _cancel_and_wait(task: asyncio.Future[Any]) -> None:
    if task.done():
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # its outcome is the caller's error


async def start_stream(
    gw: Gateway,
    request: Request,
    router: Router,
    wire: ChatCompletionRequest,
    req: GenerationRequest,
    plan: Plan,
    trace: Trace,
    caller: str,
) -> Response:
    """Run the stream to its first chunk before answering, so a failure before the first byte
    keeps its HTTP status (a 503 stays a 503, not a 200 with an SSE error) and the headers can
    say which tier answers: by the first chunk a cascade has committed to its tier."""
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
    pump = asyncio.create_task(_pump(_stream(gw, router, wire, req, plan, trace), queue))
    chunks = _drain(pump, queue, lambda: gw.callers.release(caller))
    try:
        first = await until_disconnect(request, anext(chunks))
    except StopAsyncIteration:  # pragma: no cover - a stream always ends with [DONE]
        raise SlmgateError("the stream ended before its first chunk") from None
    except BaseException:
        await chunks.aclose()
        raise

    async def rest() -> AsyncIterator[str]:
        try:
            yield first
            async for text in chunks:
                yield text
        finally:
            await chunks.aclose()

    headers = {"x-slmgate-route": trace.route, "x-slmgate-request-id": req.request_id}
    if trace.answer is not None:  # decided whole before the first byte
        headers = {**headers_of(trace.answer), **headers}
    elif trace.streaming_from is not None:
        info = router.backends[trace.streaming_from].info
        headers.update({"x-slmgate-tier": info.tier, "x-slmgate-model": info.name})
    return StreamingResponse(rest(), media_type="text/event-stream", headers=headers)


async def _pump(
    chunks: AsyncGenerator[str, None], queue: asyncio.Queue[str | BaseException | None]
) -> None:
    """Run a whole stream in one task of its own, so its timeout and cancellation apply to that
    task whichever task sends the response (Starlette may stream from another one)."""
    try:
        async for text in chunks:
            queue.put_nowait(text)
        queue.put_nowait(None)
    except BaseException as exc:
        queue.put_nowait(exc)
        if not isinstance(exc, Exception):
            raise


async def _drain(
    pump: asyncio.Task[None],
    queue: asyncio.Queue[str | BaseException | None],
    release: Callable[[], None],
) -> AsyncGenerator[str, None]:
    """The pumped chunks; on any end (done, failed, client gone) the pump is cancelled, which
    records the request, and ``release()`` runs exactly once."""
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        release()
        if not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


@dataclass(slots=True)
class _Tally:
    """What a token stream has sent so far, for its usage chunk and its last finish chunk."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    held: ChatCompletionChunkChoice | None = None  # the latest finish chunk, sent last


async def _stream(
    gw: Gateway,
    router: Router,
    wire: ChatCompletionRequest,
    req: GenerationRequest,
    plan: Plan,
    trace: Trace,
) -> AsyncGenerator[str, None]:
    """SSE for one request. Outputs a cascade could still replace, and tool calls, are decided
    before the first byte (generated whole, then sent as deltas); the rest streams token by
    token (see ``router.tier_loop`` for the free-text rule on cascades).

    A failure before the first chunk is raised (the caller turns it into an HTTP error); after
    it, it becomes an SSE error event. The request is written to the ledger before the last
    chunks (the finish chunk carrying the ``slmgate`` object, usage, ``[DONE]``) go out, so an
    outcome posted as soon as a client has read them finds its task."""
    usage_on = wire.include_usage()

    def chunk(choices: list[ChatCompletionChunkChoice], **extra: Any) -> str:
        payload = ChatCompletionChunk(id=req.request_id, model=wire.model, choices=choices,
                                      **extra)  # fmt: skip
        if usage_on and "usage" not in extra:
            payload.usage = None
        return sse(payload)

    tally = _Tally()
    answer: Answer | None = None
    final: list[str] = []
    sent = False
    gw.enter()

    def record(error: BaseException | None) -> None:
        gw.leave()
        gw.record(trace, req, answer=answer, error=error, stream=True)

    try:
        async with asyncio.timeout(gw.config.limits.request_timeout_s):
            if not router.streams_tokens(plan, req):
                answer = trace.answer = await router.complete(plan, req, trace)
                trace.mark_first_token()
                whole = _answer_chunks(answer, wire, token_text_of(router, answer), chunk)
                tally.prompt_tokens = answer.result.prompt_tokens
                tally.completion_tokens = answer.result.completion_tokens
                tally.cached_tokens = answer.result.cached_tokens
                for text in whole[:-1]:
                    sent = True
                    yield text
                final = whole[-1:]
            else:
                async for text in _token_chunks(router, plan, req, trace, wire, chunk, tally):
                    sent = True
                    yield text
                answer = trace.answer
                if tally.held is not None:
                    facts = slmgate_facts(answer) if answer is not None else None
                    final = [chunk([tally.held], slmgate=facts)]
        if usage_on:
            usage = Usage(prompt_tokens=tally.prompt_tokens,
                          completion_tokens=tally.completion_tokens,
                          prompt_tokens_details=PromptTokensDetails(
                              cached_tokens=tally.cached_tokens))  # fmt: skip
            final.append(chunk([], usage=usage))
    except BaseException as exc:  # incl. GeneratorExit / CancelledError when the client goes
        failure = _stream_failure(exc, gw.config.limits.request_timeout_s)
        if isinstance(exc, Exception) and not isinstance(exc, SlmgateError | TimeoutError):
            log.exception("error while streaming")
        record(failure)
        if not sent or not isinstance(failure, SlmgateError):
            if failure is exc:
                raise
            raise failure from None
        yield sse(failure.to_body())
        yield sse("[DONE]")
        return
    record(None)
    for text in final:
        yield text
    yield sse("[DONE]")


def _stream_failure(exc: BaseException, timeout_s: float) -> BaseException:
    """What a stream's failure is recorded and reported as."""
    if isinstance(exc, TimeoutError):
        return RequestTimeoutError(
            f"the request timed out after {timeout_s:g} s "
            "(limits.request_timeout_s, queueing included)"
        )
    if isinstance(exc, SlmgateError) or not isinstance(exc, Exception):
        return as_error(exc)
    return SlmgateError("The server had an error processing your request.")


async def _token_chunks(
    router: Router,
    plan: Plan,
    req: GenerationRequest,
    trace: Trace,
    wire: ChatCompletionRequest,
    chunk: Callable[..., str],
    tally: _Tally,
) -> AsyncIterator[str]:
    """Chunks of a token stream, all but the last finish chunk (left in ``tally.held``)."""
    started: set[int] = set()
    async with contextlib.aclosing(router.stream(plan, req, trace)) as events:
        async for event in events:
            source = router.backends.get(trace.streaming_from or "")
            token_text = getattr(source, "token_text", None)
            if event.index not in started:
                started.add(event.index)
                trace.mark_first_token()
                delta = ChoiceDelta(role="assistant", content="")
                yield chunk([ChatCompletionChunkChoice(index=event.index, delta=delta)])
            if isinstance(event, FinishEvent):
                if not tally.prompt_tokens:  # the first choice's, as in a whole response
                    tally.cached_tokens = event.cached_tokens
                tally.prompt_tokens = event.prompt_tokens
                tally.completion_tokens += event.uncounted_tokens
                if event.text:
                    yield chunk([ChatCompletionChunkChoice(
                        index=event.index, delta=ChoiceDelta(content=event.text))])  # fmt: skip
                if tally.held is not None:
                    yield chunk([tally.held])
                reason = wire_finish_reason(event.reason)
                tally.held = ChatCompletionChunkChoice(index=event.index, finish_reason=reason)
                continue
            tally.completion_tokens += 1
            logprobs = logprobs_of([event], token_text) if wire.logprobs else None
            if event.text or logprobs:
                yield chunk([ChatCompletionChunkChoice(
                    index=event.index, delta=ChoiceDelta(content=event.text),
                    logprobs=logprobs)])  # fmt: skip


def _answer_chunks(
    answer: Answer, wire: ChatCompletionRequest, token_text: Any, chunk: Callable[..., str]
) -> list[str]:
    """Each choice decided whole, as deltas; the last chunk carries the ``slmgate`` object."""
    out: list[str] = []
    last = len(answer.result.choices) - 1
    for n, (choice, check) in enumerate(zip(answer.result.choices, answer.checks, strict=True)):
        message, reason = message_of(choice, check)
        first = ChoiceDelta(role="assistant", content=message.content or "")
        out.append(chunk([ChatCompletionChunkChoice(index=choice.index, delta=first)]))
        for i, call in enumerate(message.tool_calls or []):
            head = DeltaToolCall(index=i, id=call.id or call_id(), type="function",
                                 function=DeltaFunctionCall(name=call.function.name,
                                                            arguments=""))
            args = DeltaToolCall(index=i, function=DeltaFunctionCall(
                arguments=call.function.arguments))  # fmt: skip
            out.append(chunk([ChatCompletionChunkChoice(
                index=choice.index, delta=ChoiceDelta(tool_calls=[head]))]))
            out.append(chunk([ChatCompletionChunkChoice(
                index=choice.index, delta=ChoiceDelta(tool_calls=[args]))]))  # fmt: skip
        facts = slmgate_facts(answer) if n == last else None
        out.append(chunk([ChatCompletionChunkChoice(index=choice.index, finish_reason=reason)],
                         slmgate=facts))  # fmt: skip
    return out


def as_error(exc: BaseException) -> BaseException:
    """What the ledger records for ``exc``: cancellation (client gone, task cancelled) as 499."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return GenerationCancelled("the client disconnected")
    return exc


def token_text_of(router: Router, answer: Answer) -> Any:
    return getattr(router.backends.get(answer.backend.name), "token_text", None)
