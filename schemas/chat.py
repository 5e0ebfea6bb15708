"""Wire models for OpenAI's Chat Completions API, as slmgate accepts and emits them.

Requests tolerate unknown fields (``extra="allow"``, like vLLM's ``OpenAIBaseModel``) so that new
OpenAI parameters and vLLM extras never break a client; ``ignored_fields()`` names them for the
log. Invalid values raise ``ValueError`` from validators, which pydantic reports with a ``loc``
that names the field (``("messages", 0, "role")``); the gateway turns that into a 400 whose
``param`` is ``"messages.0.role"`` (see ``ErrorResponse.from_validation_errors``).

Cross-field checks live in field validators on the *later* field and read the earlier ones from
``info.data``, so their errors point at a field rather than at the whole object. Field order in
these classes is therefore part of the contract; a failed earlier field is absent from
``info.data``, and the check is skipped so that only the real error is reported.

Responses serialise the way OpenAI's do: ``message.content: null`` stays, ``tool_calls`` goes when
empty, chunk deltas carry only what changed (see ``OpenAIBaseModel._omit_if_empty``).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
ToolChoiceMode = Literal["none", "auto", "required"]

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""OpenAI's rule for function and json_schema names."""

MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 128
OPENAI_MIN_LOGPROB = -9999.0
"""OpenAI reports -inf as this value; JSON has no -inf and the SDK rejects null."""


def _now() -> int:
    return int(time.time())


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _check_name(value: str, what: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"{what} must be 1-64 characters of a-z, A-Z, 0-9, '_' or '-'; got {value!r}"
        )
    return value


class OpenAIBaseModel(BaseModel):
    """Base of every wire model: keeps unknown fields and controls which fields are omitted.

    Subclasses list fields OpenAI leaves out of its JSON when they are None or empty in
    ``_omit_if_empty``, and fields left out unless explicitly set in ``_omit_if_unset``.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    _omit_if_empty: ClassVar[frozenset[str]] = frozenset()
    _omit_if_unset: ClassVar[frozenset[str]] = frozenset()

    # No return annotation on purpose: pydantic would take it as the serialisation schema and
    # FastAPI's docs would show every response as a bare object.
    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data: dict[str, Any] = handler(self)
        for name in self._omit_if_empty:
            if data.get(name, 0) in (None, [], {}):
                data.pop(name, None)
        for name in self._omit_if_unset:
            if name not in self.model_fields_set:
                data.pop(name, None)
        return data

    def ignored_fields(self) -> list[str]:
        """Dotted paths of unknown fields here and in nested models, for the gateway's log.

        Returns
        -------
        list[str]
            e.g. ``["service_tier", "messages.0.audio"]``; empty when everything was understood.
        """
        found = list(self.model_extra or {})
        for name, value in self.__dict__.items():  # the declared fields' values
            if isinstance(value, OpenAIBaseModel | list) and value:
                found.extend(f"{name}.{path}" for path in _ignored_in(value))
        return found

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready dict exactly as OpenAI would send it (aliases applied, omissions done)."""
        return self.model_dump(mode="json", by_alias=True)

    def to_wire_json(self) -> str:
        """Compact JSON text of ``to_wire()``, e.g. for one SSE ``data:`` line."""
        return self.model_dump_json(by_alias=True)


def _ignored_in(value: Any) -> Iterator[str]:
    if isinstance(value, OpenAIBaseModel):
        yield from value.ignored_fields()
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from (f"{i}.{path}" for path in _ignored_in(item))


# --------------------------------------------------------------------------- request parts


class TextContentPart(OpenAIBaseModel):
    """The only content part slmgate's text models can read."""

    type: Literal["text"] = "text"
    text: str


class FunctionCall(OpenAIBaseModel):
    """A function call the model made; ``arguments`` is JSON *text*, as OpenAI sends it."""

    name: str
    arguments: str


class ToolCall(OpenAIBaseModel):
    """One entry of ``tool_calls`` on an assistant message (request history or response)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    """One message of the conversation. Field order matters: checks read earlier fields."""

    role: Role
    tool_calls: list[ToolCall] | None = None
    content: str | list[TextContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = Field(default=None, validate_default=True)

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls_on_assistant_only(
        cls, value: list[ToolCall] | None, info: ValidationInfo
    ) -> list[ToolCall] | None:
        role = info.data.get("role")
        if value and role is not None and role != "assistant":
            raise ValueError(f"only assistant messages may carry tool_calls, not {role} messages")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        # Checked by hand so that errors name the part, instead of pydantic's per-branch union
        # errors whose loc would carry "list[TextContentPart]".
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        if not value:
            raise ValueError("content must not be an empty list")
        for i, part in enumerate(value):
            if isinstance(part, TextContentPart):
                continue
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text":
                raise ValueError(
                    f"content part {i} has type {kind!r}; only 'text' parts are supported "
                    "(no images, audio or files)"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} needs a string 'text'")
        return value

    @field_validator("content")
    @classmethod
    def _content_required(
        cls, value: str | list[TextContentPart] | None, info: ValidationInfo
    ) -> str | list[TextContentPart] | None:
        role = info.data.get("role")
        if value is not None or role is None:
            return value
        if role != "assistant":
            raise ValueError(f"{role} message needs content")
        if "tool_calls" in info.data and not info.data["tool_calls"]:
            raise ValueError("assistant message needs content or tool_calls")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id_on_tool(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value:
            raise ValueError("tool message needs tool_call_id (the id of the call it answers)")
        return value

    def text_content(self) -> str | None:
        """Content as one string (text parts joined without separator), or None."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(OpenAIBaseModel):
    """A callable function; ``parameters`` is a JSON schema the arguments must follow."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name_pattern(cls, value: str) -> str:
        return _check_name(value, "function name")


class ToolDefinition(OpenAIBaseModel):
    """An entry of ``tools``; only function tools exist for text models."""

    type: Literal["function"] = "function"
    function: FunctionDefinition

    @model_validator(mode="before")
    @classmethod
    def _function_tools_only(cls, data: Any) -> Any:
        # One clear error instead of "type must be 'function'" plus "function: Field required".
        kind = data.get("type", "function") if isinstance(data, Mapping) else "function"
        if kind != "function":
            raise ValueError(f"tool type {kind!r} is not supported; only 'function' tools are")
        return data


class ToolChoiceFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    """``{"type": "function", "function": {"name": ...}}``: force a call to this function."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class JsonSchemaFormat(OpenAIBaseModel):
    """``response_format.json_schema``; ``schema`` is ``schema_`` here (BaseModel has .schema)."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name_pattern(cls, value: str) -> str:
        return _check_name(value, "json_schema name")


class ResponseFormat(OpenAIBaseModel):
    """One model for all three kinds (as vLLM does) so error locs carry no union tag."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_given(
        cls, value: JsonSchemaFormat | None, info: ValidationInfo
    ) -> JsonSchemaFormat | None:
        if value is None and info.data.get("type") == "json_schema":
            raise ValueError("response_format of type 'json_schema' needs a json_schema object")
        return value


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


# --------------------------------------------------------------------------- request


class ChatCompletionRequest(OpenAIBaseModel):
    """Body of ``POST /v1/chat/completions``.

    Sampling fields left unset stay None so a backend can apply its own default. Field order
    matters: ``tool_choice`` reads ``tools``, ``stream_options`` reads ``stream``,
    ``top_logprobs`` reads ``logprobs``.
    """

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoiceMode | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stop: str | list[str] | None = None
    seed: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    metadata: dict[str, str] | None = None

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, value: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        seen: set[str] = set()
        for tool in value or []:
            if tool.function.name in seen:
                raise ValueError(f"tools: function name {tool.function.name!r} appears twice")
            seen.add(tool.function.name)
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_matches_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        name: str | None = None
        if isinstance(value, NamedToolChoice):
            name = value.function.name
        elif isinstance(value, str):
            if value not in ("none", "auto", "required"):
                raise ValueError(
                    "tool_choice must be 'none', 'auto', 'required' or "
                    f"{{'type': 'function', 'function': {{'name': ...}}}}; got {value!r}"
                )
            if value != "required":
                return value
        else:
            function = value.get("function") if isinstance(value, Mapping) else None
            if (
                not isinstance(value, Mapping)
                or value.get("type") != "function"
                or not isinstance(function, Mapping)
                or not isinstance(function.get("name"), str)
            ):
                raise ValueError(
                    "tool_choice object must be {'type': 'function', 'function': {'name': ...}}"
                )
            name = function["name"]
        if "tools" not in info.data:  # tools itself was invalid and is reported already
            return value
        offered = [tool.function.name for tool in info.data["tools"] or []]
        if not offered:
            raise ValueError(f"tool_choice {name or value!r} requires tools")
        if name is not None and name not in offered:
            raise ValueError(
                f"tool_choice names function {name!r}, which is not in tools {offered}"
            )
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and info.data.get("stream") is False:
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("logprobs") is False:
            raise ValueError("top_logprobs requires logprobs=true")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("stop must be a string or a list of strings")
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError(f"top_k must be -1 (disabled) or at least 1, got {value}")
        return value

    def effective_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (current name) or else ``max_tokens`` (deprecated), or None."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def stop_sequences(self) -> list[str]:
        """``stop`` as a list, empty when unset."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        """Whether a stream must end with a usage chunk (``stream_options.include_usage``)."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


# --------------------------------------------------------------------------- responses


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None

    @field_validator("logprob")
    @classmethod
    def _finite_logprob(cls, value: float) -> float:
        if math.isnan(value) or value > 0:
            raise ValueError(f"logprob must be <= 0, got {value}")
        return max(value, OPENAI_MIN_LOGPROB)


class TokenLogprob(TopLogprob):
    """A sampled token with its alternatives (``top_logprobs`` is empty when none asked)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(OpenAIBaseModel):
    """The assistant's answer; ``content`` is null (not absent) when it only called tools."""

    _omit_if_empty = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int = Field(ge=0)
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class PromptTokensDetails(OpenAIBaseModel):
    """``cached_tokens``: prompt tokens whose KV was reused from an earlier request."""

    cached_tokens: int = Field(default=0, ge=0)


class Usage(OpenAIBaseModel):
    """Token counts; ``total_tokens`` is filled in when the producer leaves it out."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(default=0, ge=0)
    prompt_tokens_details: PromptTokensDetails | None = None

    _omit_if_empty = frozenset({"prompt_tokens_details"})

    @model_validator(mode="after")
    def _fill_total(self) -> Usage:
        if "total_tokens" not in self.model_fields_set:
            self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self


class ChatCompletionResponse(OpenAIBaseModel):
    """Non-streaming response; ``slmgate`` carries gateway facts and is omitted when None."""

    _omit_if_empty = frozenset({"slmgate"})

    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    slmgate: dict[str, Any] | None = None


class DeltaFunctionCall(OpenAIBaseModel):
    _omit_if_empty = frozenset({"name", "arguments"})

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIBaseModel):
    """A piece of a streamed tool call: the first piece has id, type and name, later ones args."""

    _omit_if_empty = frozenset({"id", "type", "function"})

    index: int = Field(ge=0)
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChoiceDelta(OpenAIBaseModel):
    """What a chunk adds to a choice; fields not carried by this chunk are omitted."""

    _omit_if_empty = frozenset({"role", "content", "refusal", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionChunkChoice(OpenAIBaseModel):
    index: int = Field(ge=0)
    delta: ChoiceDelta = Field(default_factory=ChoiceDelta)
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    """One SSE chunk. ``usage`` appears only when set: null on every chunk of a stream with
    ``include_usage``, and filled on its last chunk, whose ``choices`` is empty."""

    _omit_if_empty = frozenset({"slmgate"})
    _omit_if_unset = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None
    slmgate: dict[str, Any] | None = None


# --------------------------------------------------------------------------- models, errors


class ModelCard(OpenAIBaseModel):
    """An entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "slmgate"


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


_TYPE_ERRORS = frozenset(
    {
        *("string_type", "int_type", "int_from_float", "int_parsing", "float_type"),
        *("float_parsing", "bool_type", "bool_parsing", "list_type", "dict_type", "model_type"),
    }
)


def param_from_loc(loc: Sequence[str | int]) -> str | None:
    """OpenAI ``param`` for a pydantic/FastAPI error ``loc``: ``("body", "messages", 0, "role")``
    becomes ``"messages.0.role"``; an error on the whole body gives None."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or None


class ErrorBody(OpenAIBaseModel):
    """OpenAI's error object; ``code`` is a string such as ``"invalid_value"``, never the status."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """``{"error": {...}}``, the body of every non-2xx answer and of an in-stream error."""

    error: ErrorBody

    @classmethod
    def from_validation_errors(cls, errors: Sequence[Mapping[str, Any]]) -> ErrorResponse:
        """400 body for ``ValidationError.errors()`` (or FastAPI's ``RequestValidationError``).

        Parameters
        ----------
        errors
            The error dicts; the first one names ``param``, the others are counted.

        Returns
        -------
        ErrorResponse
            type ``invalid_request_error``; code ``missing_required_parameter``,
            ``invalid_type`` or ``invalid_value``.

        Raises
        ------
        ValueError
            If ``errors`` is empty.
        """
        if not errors:
            raise ValueError("from_validation_errors needs at least one error")
        first = errors[0]
        param = param_from_loc(first.get("loc", ()))
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        kind = first.get("type")
        if kind == "missing":
            code = "missing_required_parameter"
        elif kind in _TYPE_ERRORS:
            code = "invalid_type"
        else:
            code = "invalid_value"
        body = ErrorBody(message=message, type="invalid_request_error", param=param, code=code)
        return cls(error=body)
