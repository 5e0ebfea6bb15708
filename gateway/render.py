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
    PromptTokensDetails,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def logprobs_of(events: list[TokenEvent], token_text: Any) -> ChoiceLogprobs:
    """OpenAI ``logprobs.content`` for ``events``; ``token_text(id)`` gives a token's text
    (None: the backend has no vocabulary of its own, e.g. a remote one; use the event text)."""
    content = []
    for event in events:
        own = token_text is not None and event.token_id >= 0
        text = token_text(event.token_id) if own else event.text
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
    """The ``slmgate`` object: which tier answered, why, what it cost, and how sure it was."""
    specs = [c.spec for c in answer.result.choices if c.spec is not None]
    return {
        "route": answer.route,
        "tier": answer.backend.tier,
        "model": answer.backend.name,
        "valid": answer.valid,
        "executable": answer.executable,
        "validation_errors": [e for c in answer.checks for e in c.errors][:5],
        "cost_usd": round(answer.cost_usd, 10),
        "counterfactual_cost_usd": round(answer.counterfactual_cost_usd, 10),
        "counterfactual_estimated": answer.counterfactual_estimated,
        "confidence": answer.confidence,
        "signals": answer.signals,
        "fallback_reason": answer.fallback_reason,
        "memory_examples": list(answer.memory_examples),  # demonstrations the first tier saw
        "forced_tokens": sum(e.forced for c in answer.result.choices for e in c.events),
        # The engine whose grammar shaped the answer (None: unconstrained or a remote tier).
        "grammar_engine": next(
            (a.grammar_engine for a in answer.attempts if a.outcome == "accepted"), None
        ),
        "attempts": [
            {
                "tier": a.tier,
                "model": a.backend,
                "outcome": a.outcome,
                "confidence": a.confidence,
                "fallback_reason": a.fallback_reason,
                "cost_usd": round(a.cost_usd, 10),
                "prompt_tokens": a.prompt_tokens,
                "completion_tokens": a.completion_tokens,
                "latency_s": round(a.latency_s, 4),
                "compute_s": None if a.compute_s is None else round(a.compute_s, 4),
                "grammar_engine": a.grammar_engine,
                # verified: it checked the earlier tier's answer as a draft and kept
                # reused_tokens of it; regenerated: it could not, and wrote its own from scratch
                "escalation": a.hint_mode,
                "reused_tokens": a.hint_reused,
                "error": a.error,
                "energy_j": None if a.energy_j is None else round(a.energy_j, 4),
                "energy": None if a.energy_j is None else (
                    "measured" if a.energy_measured else "estimated"),
            }
            for a in answer.attempts
        ],
        "specreason": answer.reasoning,  # steps, who wrote them, their scores (specreason)
        "reused_tokens": sum(a.hint_reused or 0 for a in answer.attempts
                             if a.outcome == "accepted"),  # from an earlier tier's answer
        "speculation": None if not specs else {
            "drafter": specs[0].drafter,
            "drafted": sum(s.drafted for s in specs),
            "accepted": sum(s.accepted for s in specs),
            "steps": sum(s.steps for s in specs),
            "histogram": _sum_histograms([s.histogram for s in specs]),
        },
    }  # fmt: skip


def _sum_histograms(histograms: list[tuple[int, ...]]) -> list[int]:
    out = [0] * max((len(h) for h in histograms), default=0)
    for h in histograms:
        for i, n in enumerate(h):
            out[i] += n
    return out


def headers_of(answer: Answer) -> dict[str, str]:
    headers = {
        "x-slmgate-route": answer.route,
        "x-slmgate-tier": answer.backend.tier,
        "x-slmgate-model": answer.backend.name,
        "x-slmgate-valid": str(answer.valid).lower(),
        "x-slmgate-cost-usd": f"{answer.cost_usd:.10f}",
    }
    if answer.fallback_reason:
        headers["x-slmgate-fallback-reason"] = answer.fallback_reason
    if answer.confidence is not None:
        headers["x-slmgate-confidence"] = f"{answer.confidence:.4f}"
    return headers


def response_of(
    answer: Answer, model: str, want_logprobs: bool, token_text: Any, request_id: str
) -> ChatCompletionResponse:
    """The response body; its ``id`` is the request's ledger id (as a stream's chunks' is)."""
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
        prompt_tokens_details=PromptTokensDetails(cached_tokens=answer.result.cached_tokens),
    )
    return ChatCompletionResponse(
        id=request_id, model=model, choices=choices, usage=usage, slmgate=slmgate_facts(answer)
    )


def sse(payload: Any) -> str:
    """One SSE event; ``payload`` is a wire model, a dict, or the string ``[DONE]``."""
    if payload == "[DONE]":
        return "data: [DONE]\n\n"
    if hasattr(payload, "to_wire_json"):
        return f"data: {payload.to_wire_json()}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
