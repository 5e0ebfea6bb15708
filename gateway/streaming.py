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


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise GenerationCancelled("the client disconnected")
    return await task


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
    token (see ``router.router`` for the free-text rule on cascades).

    A failure before the first chunk is raised (the caller turns it into an HTTP error); after
    it, it becomes an SSE error event. The last finish chunk carries the ``slmgate`` object."""
    cid = req.request_id
    usage_on = wire.include_usage()
    sent = False

    def chunk(choices: list[ChatCompletionChunkChoice], **extra: Any) -> str:
        payload = ChatCompletionChunk(id=cid, model=wire.model, choices=choices, **extra)
        if usage_on and "usage" not in extra:
            payload.usage = None
        return sse(payload)

    prompt_tokens = completion_tokens = cached_tokens = 0
    answer: Answer | None = None
    failure: BaseException | None = None
    gw.in_flight += 1
    try:
        async with asyncio.timeout(gw.config.limits.request_timeout_s):
            if not router.streams_tokens(plan, req):
                answer = await router.complete(plan, req, trace)
                trace.answer = answer
                prompt_tokens = answer.result.prompt_tokens
                completion_tokens = answer.result.completion_tokens
                cached_tokens = answer.result.cached_tokens
                trace.mark_first_token()
                for text in _answer_chunks(answer, wire, token_text_of(router, answer), chunk):
                    sent = True
                    yield text
            else:
                started: set[int] = set()
                held: ChatCompletionChunkChoice | None = None  # the latest finish chunk
                async with contextlib.aclosing(router.stream(plan, req, trace)) as events:
                    async for event in events:
                        source = router.backends.get(trace.streaming_from or "")
                        token_text = getattr(source, "token_text", None)
                        if event.index not in started:
                            started.add(event.index)
                            trace.mark_first_token()
                            delta = ChoiceDelta(role="assistant", content="")
                            sent = True
                            yield chunk([ChatCompletionChunkChoice(index=event.index, delta=delta)])
                        if isinstance(event, FinishEvent):
                            if not prompt_tokens:  # the first choice's, as in a whole response
                                cached_tokens = event.cached_tokens
                            prompt_tokens = event.prompt_tokens
                            if event.text:
                                yield chunk([ChatCompletionChunkChoice(
                                    index=event.index, delta=ChoiceDelta(content=event.text))])
                            if held is not None:
                                yield chunk([held])
                            held = ChatCompletionChunkChoice(
                                index=event.index, finish_reason=wire_finish_reason(event.reason))
                            continue  # fmt: skip
                        completion_tokens += 1
                        logprobs = logprobs_of([event], token_text) if wire.logprobs else None
                        if event.text or logprobs:
                            yield chunk([ChatCompletionChunkChoice(
                                index=event.index, delta=ChoiceDelta(content=event.text),
                                logprobs=logprobs)])  # fmt: skip
                answer = trace.answer
                if held is not None:
                    facts = slmgate_facts(answer) if answer is not None else None
                    yield chunk([held], slmgate=facts)
        if usage_on:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            )
            yield chunk([], usage=usage)
    except TimeoutError:
        failure = RequestTimeoutError(
            f"the request timed out after {gw.config.limits.request_timeout_s:g} s "
            "(limits.request_timeout_s, queueing included)"
        )
        if not sent:
            gw.in_flight -= 1
            gw.record(trace, req, error=failure, stream=True)
            raise failure from None
        yield sse(failure.to_body())
    except SlmgateError as exc:
        failure = exc
        if not sent:
            gw.in_flight -= 1
            gw.record(trace, req, error=failure, stream=True)
            raise
        yield sse(exc.to_body())
    except BaseException as exc:  # incl. GeneratorExit when the client goes away
        failure = exc
        if not isinstance(exc, Exception):
            gw.in_flight -= 1
            gw.record(trace, req, answer=answer, error=as_error(exc), stream=True)
            raise
        logging.getLogger(__name__).exception("error while streaming")
        if not sent:
            gw.in_flight -= 1
            gw.record(trace, req, error=exc, stream=True)
            raise
        yield sse(SlmgateError("The server had an error processing your request.").to_body())
    gw.in_flight -= 1
    gw.record(trace, req, answer=answer, error=failure, stream=True)
    yield sse("[DONE]")


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
