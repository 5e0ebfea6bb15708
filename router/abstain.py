"""Abstaining when the model wanted a function nobody offered.

In ``tool_choice: auto`` the grammar lets a model choose text or a call, but once it opens a call
the name can only be an offered tool. A model that meant to call something else (an irrelevant
request: "what is the area of this triangle?" with only ``get_weather`` offered) is thus made to
call the wrong tool. Measured on BFCL's irrelevance category, Qwen2.5-Coder-1.5B abstained on 0%
of items through the grammar and on 65% unconstrained, where it writes the name it wants
(BENCHMARKS.md, "Tool calls").

So after a call in ``auto`` mode, the same model continues its own output from where the first
call's name begins, greedily and without the grammar, for a few tokens (the *probe*). If the name
it writes is no offered tool (nor the start of one), the attempt is decoded again with text only
(no call may start), which is the abstention the model wanted. Pure helpers here; the tier loop
runs the probe as a booked attempt.
"""

from __future__ import annotations

import re
from dataclasses import replace

from decoding.constraint import NoConstraint, Regex, ToolCalls
from decoding.tool_grammar import TEXT_START
from decoding.types import Choice, GenerationRequest, SamplingParams

PROBE_TOKENS = 16  # enough for a function name and its closing quote
_NAME_KEY = re.compile(r'"name"\s*:\s*"')
# Text that cannot start a tool call (the grammar's own rule for text in ``auto`` mode).
TEXT_ONLY = Regex(TEXT_START + r"[\s\S]*")


def probe_due(req: GenerationRequest, tool_calls: int, continuable: bool) -> bool:
    """Whether a finished attempt's first call should be probed: auto mode through the
    grammar, at least one call made, a backend that can continue an output."""
    constraint = req.constraint
    return (
        continuable
        and req.guided
        and tool_calls > 0
        and isinstance(constraint, ToolCalls)
        and constraint.mode == "auto"
        and constraint.final is None
    )


def name_boundary(choice: Choice) -> tuple[int, int] | None:
    """Where to continue from: (tokens to keep, characters they hold), the last token boundary
    at or before the first call's name; None when no call name is found in the output."""
    text = "".join(e.text for e in choice.events)
    found = _NAME_KEY.search(text)
    if found is None:
        return None
    offset = kept = 0
    for event in choice.events:
        if offset + len(event.text) > found.end():
            break
        offset += len(event.text)
        kept += 1
    return kept, offset


def probe_request(req: GenerationRequest, choice: Choice, kept: int) -> GenerationRequest:
    """The probe: the same prompt and tools, the output's first ``kept`` tokens, then greedy
    unconstrained decoding up to the end of the name (its closing quote, then ``,`` or ``}``)."""
    params = SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, stop=('",', '"}'))
    return replace(
        req,
        params=params,
        constraint=NoConstraint(),
        continue_ids=tuple(choice.token_ids[:kept]),
        request_id=req.request_id + "~probe",
    )


def wanted_name(head: str, continuation: str) -> str | None:
    """The name the probe wrote after the first ``"name": "`` of ``head + continuation``."""
    text = head + continuation
    found = _NAME_KEY.search(text)
    if found is None:
        return None
    return text[found.end() :].split('"', 1)[0]


def wants_unoffered(name: str | None, offered: list[str]) -> bool:
    """A name the model wrote that is neither an offered tool nor the start of one (a probe
    cut at its token budget leaves a prefix)."""
    if name is None:
        return False
    return not any(tool == name or tool.startswith(name) for tool in offered)


def text_only(req: GenerationRequest) -> GenerationRequest:
    """``req`` decoded as text that cannot start a call (its abstention)."""
    return replace(req, constraint=TEXT_ONLY)
