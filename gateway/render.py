"""Render router answers as OpenAI responses and SSE chunks."""

from __future__ import annotations

import json
import secrets
from typing import Any

from decoding.types import Choice, TokenEvent
from decoding.types import FinishReason as EngineFinishReason
from decoding.validate import OutputCheck
from router.router import Answer
from schemas.chat import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChoiceLogprobs,
    FinishReason,
    FunctionCall,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def logprobs_of(events: list[TokenEvent], token_text: Any) -> ChoiceLogprobs:
    """OpenAI ``logprobs.content`` for ``events``; ``token_text(id)`` gives a token's text."""
    content = []
    for event in events:
        text = token_text(event.token_id)
        content.append(
            TokenLogprob(
                token=text,
                logprob=event.logprob,
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                    for t in event.top_logprobs
                ],
            )
        )
    return ChoiceLogprobs(content=content)


def wire_finish_reason(reason: EngineFinishReason) -> FinishReason:
    """OpenAI's finish_reason for an engine one (a cancelled choice is never rendered)."""
    return "length" if reason == "length" else "stop"


def message_of(choice: Choice, check: OutputCheck) -> tuple[ResponseMessage, FinishReason]:
    """The assistant message and finish_reason (``tool_calls`` when it called tools)."""
    reason = wire_finish_reason(choice.finish_reason)
    parsed = check.parsed
    if parsed is not None and parsed.tool_calls:
        calls = [
            ToolCall(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in parsed.tool_calls
        ]
        message = ResponseMessage(content=parsed.content, tool_calls=calls)
        return message, "tool_calls" if reason == "stop" else reason
    return ResponseMessage(content=choice.text), reason


def slmgate_facts(answer: Answer) -> dict[str, Any]:
    """The ``slmgate`` object: which tier answered and whether the output passed its checks."""
    return {
        "route": answer.route,
        "tier": answer.backend.tier,
        "model": answer.backend.name,
        "valid": all(c.valid for c in answer.checks),
        "validation_errors": [e for c in answer.checks for e in c.errors][:5],
        "cost_usd": round(answer.cost_usd, 10),
        "forced_tokens": sum(e.forced for c in answer.result.choices for e in c.events),
        "fallback_reason": None,
    }


def headers_of(answer: Answer) -> dict[str, str]:
    facts = slmgate_facts(answer)
    return {
        "x-slmgate-route": answer.route,
        "x-slmgate-tier": answer.backend.tier,
        "x-slmgate-model": answer.backend.name,
        "x-slmgate-valid": str(facts["valid"]).lower(),
        "x-slmgate-cost-usd": f"{answer.cost_usd:.10f}",
    }


def response_of(
    answer: Answer, model: str, want_logprobs: bool, token_text: Any
) -> ChatCompletionResponse:
    choices = []
    for choice, check in zip(answer.result.choices, answer.checks, strict=True):
        message, reason = message_of(choice, check)
        choices.append(
            ChatCompletionChoice(
                index=choice.index,
                message=message,
                logprobs=logprobs_of(choice.events, token_text) if want_logprobs else None,
                finish_reason=reason,
            )
        )
    usage = Usage(
        prompt_tokens=answer.result.prompt_tokens,
        completion_tokens=answer.result.completion_tokens,
    )
    return ChatCompletionResponse(
        model=model, choices=choices, usage=usage, slmgate=slmgate_facts(answer)
    )


def sse(payload: Any) -> str:
    """One SSE event; ``payload`` is a wire model, a dict, or the string ``[DONE]``."""
    if payload == "[DONE]":
        return "data: [DONE]\n\n"
    if hasattr(payload, "to_wire_json"):
        return f"data: {payload.to_wire_json()}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
