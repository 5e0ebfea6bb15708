"""Logged requests for the offline simulator, and a proxy tokenizer for chat traces.

Two JSONL formats are read, one object per line:

- ``{"prompt_ids": [...], "output_ids": [...]}``: one request, already tokenized;
- ``{"messages": [...], "tools": [...]}`` (OpenAI chat format): one request per assistant turn,
  whose prompt is the conversation before it and whose output is that turn.

Chat traces carry text, and the simulator needs no model, so there is no model tokenizer either.
:class:`ProxyTokenizer` splits text into words, digit groups, punctuation runs and whitespace,
close to how BPE tokenizers pre-split text, so token counts and repetition resemble a real
vocabulary's. It is a proxy: acceptance measured with it is an estimate of what a real
tokenizer gives, not the same number.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProxyTokenizer", "TraceRequest", "chat_requests", "load_requests", "render_turn"]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One logged request: what the model saw and what it produced."""

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]


class ProxyTokenizer:
    """Deterministic stand-in tokenizer: regex pieces, ids in order of first appearance.

    A piece is a word with its leading space, up to three digits with a leading space, a run
    of punctuation with a leading space, or a run of whitespace (the GPT-2/Llama-3 style
    pre-split, without merging pieces further). Every character lands in exactly one piece.

    Examples
    --------
    >>> tok = ProxyTokenizer()
    >>> tok.pieces('{"order_id": "#W2378156"}')
    ['{"', 'order', '_', 'id', '":', ' "#', 'W', '237', '815', '6', '"}']
    >>> tok.encode("to be or not to be")
    [0, 1, 2, 3, 4, 1]
    """

    _PIECE = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\s\w]|_)+|\s+")

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def pieces(self, text: str) -> list[str]:
        return self._PIECE.findall(text)

    def encode(self, text: str) -> list[int]:
        vocab = self.vocab
        return [vocab.setdefault(piece, len(vocab)) for piece in self.pieces(text)]


def render_turn(message: Mapping[str, Any]) -> str:
    """One message in a ChatML-like layout; tool calls become ``<tool_call>`` JSON blocks."""
    role = message.get("role", "user")
    body = message.get("content") or ""
    if not isinstance(body, str):  # content parts: keep the text ones
        body = "".join(part.get("text", "") for part in body if isinstance(part, Mapping))
    for call in message.get("tool_calls") or ():
        function = call.get("function", {})
        arguments = function.get("arguments", "")
        # Arguments that are not JSON stay the raw string the model wrote.
        with contextlib.suppress(TypeError, ValueError):
            arguments = json.loads(arguments)
        call_json = json.dumps({"name": function.get("name"), "arguments": arguments})
        body += f"<tool_call>\n{call_json}\n</tool_call>"
    return f"<|im_start|>{role}\n{body}<|im_end|>\n"


def chat_requests(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    tokenizer: ProxyTokenizer,
) -> Iterator[TraceRequest]:
    """One request per assistant turn: the rendered conversation before it, then the turn.

    Tools go first as a system block of one JSON line per tool (the way chat templates list
    them), and the prompt ends with the assistant header the model continues from.
    """
    prefix = ""
    if tools:
        prefix = render_turn(
            {"role": "system", "content": "# Tools\n" + "\n".join(json.dumps(t) for t in tools)}
        )
    for message in messages:
        turn = render_turn(message)
        if message.get("role") == "assistant":
            header = "<|im_start|>assistant\n"
            yield TraceRequest(
                prompt_ids=tuple(tokenizer.encode(prefix + header)),
                output_ids=tuple(tokenizer.encode(turn[len(header) :])),
            )
        prefix += turn


def load_requests(
    path: str | Path, limit: int | None = None, tokenizer: ProxyTokenizer | None = None
) -> list[TraceRequest]:
    """Read requests from a JSONL trace, in file order.

    Parameters
    ----------
    limit:
        Read only the first ``limit`` lines (records or conversations).
    tokenizer:
        For chat traces; a fresh :class:`ProxyTokenizer` by default.

    Raises
    ------
    ValueError
        If a line is neither format (the message names the line).
    """
    tokenizer = tokenizer or ProxyTokenizer()
    requests: list[TraceRequest] = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and number > limit:
                break
            if not line.strip():
                continue
            record = json.loads(line)
            if isinstance(record, dict) and "prompt_ids" in record and "output_ids" in record:
                requests.append(
                    TraceRequest(tuple(record["prompt_ids"]), tuple(record["output_ids"]))
                )
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                requests.extend(
                    chat_requests(record["messages"], record.get("tools") or [], tokenizer)
                )
            else:
                raise ValueError(
                    f"{path}:{number}: expected prompt_ids/output_ids or messages, "
                    f"got keys {sorted(record) if isinstance(record, dict) else type(record)}"
                )
    return requests
