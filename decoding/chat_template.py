"""Render OpenAI chat messages into prompt token ids with the model's own chat template.

Templates that know tools (Qwen2.5's) get the tools and tool messages as they are. For templates
that ignore tools (SmolLM2's), slmgate renders the tool definitions into the system message in
the Hermes/Qwen style and rewrites tool traffic as text, so every model sees the same protocol
that the tool grammar (``decoding.tool_grammar``) enforces.
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part.get("text", "") for part in content if isinstance(part, dict)
    )


def template_supports_tools(tokenizer: Any) -> bool:
    template = tokenizer.chat_template or ""
    return "tools" in template and "tool_call" in template


def _arguments_obj(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", {})
    body = {"name": fn.get("name"), "arguments": _arguments_obj(fn.get("arguments", {}))}
    return "<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>"


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    return TOOLS_PREAMBLE + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + (
        TOOLS_POSTAMBLE
    )


def _native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template with tool support (arguments as objects, content as text)."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"], "content": text_of(m.get("content"))}
        if msg["role"] == "developer":
            msg["role"] = "system"
        if m.get("tool_calls"):
            msg["tool_calls"] = [
                {
                    "type": "function",
                    "id": c.get("id"),
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": _arguments_obj(c["function"].get("arguments", {})),
                    },
                }
                for c in m["tool_calls"]
            ]
        if m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _text_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[
    dict[str, Any]
]:
    """Messages for a template without tool support: tools in the system text, calls as tags,
    tool results as user turns wrapped in ``<tool_response>``."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], text_of(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            parts = [content] if content else []
            parts += [_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            wrapped = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + wrapped
            else:
                out.append({"role": "user", "content": wrapped, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    if tools:
        tool_text = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + tool_text
        else:
            out.insert(0, {"role": "system", "content": tool_text})
    for msg in out:
        msg.pop("_tool", None)
    return out


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None) -> list[int]:  # fmt: skip
    """Token ids of the prompt, ending with the assistant turn's opening."""
    tools = tools or []
    if template_supports_tools(tokenizer):
        text = tokenizer.apply_chat_template(
            _native_messages(messages),
            tools=tools or None,
            add_generation_prompt=True,
            tokenize=False,
        )
    else:
        text = tokenizer.apply_chat_template(
            _text_messages(messages, tools), add_generation_prompt=True, tokenize=False
        )
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids
