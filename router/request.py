"""Turn a wire request into a ``GenerationRequest``: sampling params, constraint, tools."""

from __future__ import annotations

from typing import Any, Literal

from decoding.constraint import (
    Constraint,
    JsonObject,
    JsonSchema,
    NoConstraint,
    ToolCalls,
    ToolSpec,
)
from decoding.types import GenerationRequest, SamplingParams
from schemas.chat import ChatCompletionRequest, NamedToolChoice


def sampling_params(req: ChatCompletionRequest) -> SamplingParams:
    """OpenAI defaults: temperature 1, top_p 1; ``top_logprobs`` only counts with ``logprobs``."""
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        seed=req.seed,
        max_tokens=req.effective_max_tokens(),
        stop=tuple(req.stop_sequences()),
        n=req.n,
        logprobs=req.logprobs,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
    )


def response_constraint(req: ChatCompletionRequest) -> JsonObject | JsonSchema | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JsonObject()
    assert fmt.json_schema is not None  # checked by the wire model
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return JsonSchema(schema, strict=bool(fmt.json_schema.strict), name=fmt.json_schema.name)


def constraint_for(req: ChatCompletionRequest) -> Constraint:
    """The grammar the request asks for. ``tool_choice: none`` keeps the tools in the prompt
    (as OpenAI does) but constrains only to ``response_format``."""
    final = response_constraint(req)
    choice = req.tool_choice
    if not req.tools or choice == "none":
        return final or NoConstraint()
    tools = [
        ToolSpec(
            t.function.name,
            t.function.parameters or {"type": "object", "properties": {}},
            bool(t.function.strict),
            position=i,
        )
        for i, t in enumerate(req.tools)
    ]
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.name == choice.function.name]
        return ToolCalls(tuple(named), mode="named", parallel=False)
    mode: Literal["auto", "required"] = "required" if choice == "required" else "auto"
    return ToolCalls(
        tuple(tools), mode=mode, parallel=req.parallel_tool_calls,
        final=final if mode == "auto" else None,
    )  # fmt: skip


def generation_request(
    req: ChatCompletionRequest, request_id: str, task_id: str | None = None
) -> GenerationRequest:
    messages: list[dict[str, Any]] = [
        m.model_dump(mode="json", exclude_none=True) for m in req.messages
    ]
    tools = [t.model_dump(mode="json", exclude_none=True) for t in req.tools or []]
    return GenerationRequest(
        messages=tuple(messages),
        params=sampling_params(req),
        constraint=constraint_for(req),
        tools=tuple(tools),
        request_id=request_id,
        task_id=task_id,
        incremental=bool(req.stream),
    )
