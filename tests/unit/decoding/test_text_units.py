"""Tool-call parsing, stop strings, output checks and token sampling: pure, no model."""

from __future__ import annotations

import math

import pytest
import torch
import xgrammar as xgr

from decoding.constraint import JsonObject, JsonSchema, ToolCalls, ToolSpec
from decoding.detokenize import StopStrings
from decoding.sampling import pick_token
from decoding.tool_parser import ParsedToolCall, parse_tool_calls
from decoding.types import SamplingParams
from decoding.validate import check_output
from schemas.errors import InvalidRequestError, UnsatisfiableSchemaError

CALL = '{"name": "f", "arguments": {"x": 1}}'

# (text, expected content, expected calls, why)
PARSE_CASES = [
    (CALL, None, [("f", '{"x": 1}')], "bare call"),
    (f"<tool_call>\n{CALL}\n</tool_call>", None, [("f", '{"x": 1}')], "tagged call"),
    (f"Sure.\n<tool_call>\n{CALL}\n</tool_call>", "Sure.", [("f", '{"x": 1}')], "text + tag"),
    (f"{CALL}\n{CALL}", None, [("f", '{"x": 1}')] * 2, "bare parallel calls, one per line"),
    (f"[{CALL}, {CALL}]", None, [("f", '{"x": 1}')] * 2, "bare calls as an array"),
    (f"```json\n{CALL}\n```", None, [("f", '{"x": 1}')], "fenced bare call"),
    (f"```json\n{CALL}\n```\n```json\n{CALL}\n```", None, [("f", '{"x": 1}')] * 2,
     "parallel fenced calls, as the tool grammar separates them"),
    (f"```json\n{CALL}\n```\n```json\n{{\"name\": \"f\", \"argu", None,
     [("f", '{"x": 1}')], "a fence cut by max_tokens is dropped"),
    (f"Here:\n```json\n{CALL}\n```", f"Here:\n```json\n{CALL}\n```", [],
     "a fence after text is content: the grammar only constrains a leading fence"),
    (f"{{{CALL}}}", None, [("f", '{"x": 1}')], "doubled outer braces (Qwen2.5-Coder-1.5B)"),
    ("{{" + CALL, "{{" + CALL, [], "doubled braces must close doubled"),
    ('{"name": "f", "parameters": {"x": 1}}', None, [("f", '{"x": 1}')], "parameters alias"),
    ('{"name": "f", "arguments": "{\\"x\\": 1}"}', None, [("f", '{"x": 1}')], "string args"),
    ('{"name": "g", "arguments": {}}', '{"name": "g", "arguments": {}}', [], "unknown tool"),
    ('{"answer": 1}', '{"answer": 1}', [], "plain JSON is content"),
    ("<tool_call>\n{broken\n</tool_call>", "<tool_call>\n{broken\n</tool_call>", [], "bad JSON"),
    ('<tool_call>\n{"name": "f", "arguments": {"x"', '<tool_call>\n{"name": "f", "arguments": {"x"',
     [], "truncated call is not a call"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "content", "calls", "why"), PARSE_CASES)
def test_parse_tool_calls(
    text: str, content: str | None, calls: list[tuple[str, str]], why: str
) -> None:
    parsed = parse_tool_calls(text, ["f"])
    assert parsed.content == content, why
    assert parsed.tool_calls == tuple(ParsedToolCall(n, a) for n, a in calls), why


CALL_G = '{"name": "g", "arguments": {"y": "z"}}'
# The multi-call forms the tool grammar allows (test_grammar_unit.MULTI_CALL_FORMS), same calls.
MULTI_CALL_FORMS = [
    f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{CALL_G}\n</tool_call>",
    f"{CALL}\n{CALL_G}",
    f"```json\n{CALL}\n{CALL_G}\n```",
    f"```json\n{CALL}\n```\n```json\n{CALL_G}\n```",
    f"[{CALL}, {CALL_G}]",
    f"```json\n[{CALL}, {CALL_G}]\n```",
]


@pytest.mark.parametrize("text", MULTI_CALL_FORMS)
def test_every_multi_call_form_parses_into_the_same_calls(text: str) -> None:
    parsed = parse_tool_calls(text, ["f", "g"])
    assert parsed.content is None
    assert parsed.tool_calls == (ParsedToolCall("f", '{"x": 1}'), ParsedToolCall("g", '{"y": "z"}'))


@pytest.mark.parametrize(
    ("stops", "chunks", "released", "hit"),
    [
        (["END"], ["abcE", "N", "D tail"], ["abc", "", ""], True),
        (["END"], ["abcE", "x"], ["abc", "Ex"], False),  # "E" held, then released
        (["\n\n", "###"], ["a\n", "\nb"], ["a", ""], True),
        ([], ["a", "b"], ["a", "b"], False),
    ],
)
def test_stop_strings(stops: list[str], chunks: list[str], released: list[str], hit: bool) -> None:
    watcher = StopStrings(stops)
    results = [watcher.push(c) for c in chunks]
    assert [r[0] for r in results] == released
    assert results[-1][1] is hit


TOOL = ToolSpec("f", {"type": "object", "properties": {"x": {"type": "integer"}},
                      "required": ["x"]})  # fmt: skip


@pytest.mark.parametrize(
    ("constraint", "text", "valid"),
    [
        (JsonObject(), '{"a": 1}', True),
        (JsonObject(), "[1]", False),
        (JsonSchema({"type": "array", "uniqueItems": True}), "[1, 1]", False),
        (JsonSchema({"type": "string", "format": "email"}), '"not-an-email"', False),
        (JsonSchema({"type": "string", "format": "email"}), '"a@b.org"', True),
        (JsonSchema({"type": "integer"}), '{"a": 1', False),
        (ToolCalls((TOOL,), mode="required"), CALL, True),
        (ToolCalls((TOOL,), mode="required"), "no call", False),
        (ToolCalls((TOOL,), mode="auto"), "no call", True),
        (ToolCalls((TOOL,), mode="auto"), '{"name": "f", "arguments": {"x": "1"}}', False),
        (ToolCalls((TOOL,), mode="required", parallel=False), f"{CALL}\n{CALL}", False),
        (ToolCalls((TOOL,), mode="auto"), f"```json\n{CALL}\n{CALL}\n{{\"name\": \"f", False),
        (ToolCalls((TOOL,), mode="auto"), '<tool_call>\n{"name": "f", "argu', False),
        (ToolCalls((TOOL,), mode="auto"), "```python\nprint(1)\n```", True),
        (ToolCalls((TOOL,), final=JsonSchema({"type": "object", "required": ["y"]})),
         '{"y": 2}', True),
        (ToolCalls((TOOL,), final=JsonSchema({"type": "object", "required": ["y"]})),
         '{"z": 2}', False),
    ],
)
def test_check_output(constraint: object, text: str, valid: bool) -> None:
    assert check_output(constraint, text).valid is valid  # type: ignore[arg-type]


def _bitmask(vocab: int, allowed: list[int]) -> torch.Tensor:
    mask = xgr.allocate_token_bitmask(1, vocab)
    mask.zero_()
    for token in allowed:
        mask[0, token // 32] |= 1 << (token % 32)
    return mask


LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])


def test_pick_greedy_respects_mask_and_reports_constrained_distribution() -> None:
    pick = pick_token(LOGITS, _bitmask(5, [0, 1]), SamplingParams(temperature=0), None, n_top=2)
    assert pick.token_id == 0  # 4 has the highest logit but is forbidden
    p0 = math.exp(2) / (math.exp(2) + math.exp(1))
    assert pick.logprob == pytest.approx(math.log(p0))
    assert pick.entropy == pytest.approx(-(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)))
    total = sum(math.exp(v) for v in LOGITS.tolist())
    assert pick.allowed_mass == pytest.approx((math.exp(2) + math.exp(1)) / total)
    assert [t for t, _ in pick.top] == [0, 1]
    assert not pick.forced


def test_single_allowed_token_is_forced() -> None:
    pick = pick_token(LOGITS, _bitmask(5, [3]), SamplingParams(temperature=1.0), None)
    assert (pick.token_id, pick.forced, pick.logprob, pick.entropy) == (3, True, 0.0, 0.0)


def test_no_allowed_token_is_a_clear_error() -> None:
    with pytest.raises(UnsatisfiableSchemaError):
        pick_token(LOGITS, _bitmask(5, []), SamplingParams(temperature=0), None)


def test_unconstrained_allowed_mass_is_one() -> None:
    assert pick_token(LOGITS, None, SamplingParams(temperature=0), None).allowed_mass == 1.0


def draws(params: SamplingParams, seed: int, n: int = 200) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [pick_token(LOGITS, None, params, gen).token_id for _ in range(n)]


def test_same_seed_same_draws() -> None:
    params = SamplingParams(temperature=1.0)
    assert draws(params, 7) == draws(params, 7)
    assert draws(params, 7) != draws(params, 8)


def test_top_k_and_top_p_limit_the_support() -> None:
    assert set(draws(SamplingParams(temperature=1.5, top_k=2), 1)) == {0, 4}
    # softmax(LOGITS): token 4 holds 0.64 of the mass, token 0 0.24: top_p 0.5 keeps only 4.
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5), 1)) == {4}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8), 1)) == {0, 4}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_sampling_params(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param
