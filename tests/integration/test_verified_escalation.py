"""Verified escalation on real models (float32): a draft hint never changes the output.

The verifier is Qwen2.5-Coder-0.5B in float32, on the serial engine and the batched one; hints
are SmolLM2's answer to the same request (another tokenizer: realigned on text), the verifier's
own answer (reused whole, in a few passes), and a corrupted copy of it (reused up to the
corruption). Greedy output must be token-identical to the verifier alone, for free text, a JSON
schema and tool calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from decoding.constraint import Constraint, JsonSchema, NoConstraint, ToolCalls
from decoding.engine import EmbeddedEngine
from decoding.types import Choice, GenerationRequest, SamplingParams
from tests.integration.test_engine import TIME, WEATHER, spec, user

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "hobbies": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}  # fmt: skip

CASES: list[tuple[str, str, Constraint, tuple[dict[str, Any], ...]]] = [
    ("text", "Explain in three sentences why the sky is blue.", NoConstraint(), ()),
    ("json", "Invent a person with two hobbies, as JSON.", JsonSchema(PERSON), ()),
    ("tools", "What's the weather in Paris, in celsius, and the time in Tokyo?",
     ToolCalls((spec(WEATHER), spec(TIME)), mode="required", parallel=True), (WEATHER, TIME)),
]  # fmt: skip


@pytest.fixture(scope="module", params=["serial", "batched"])
def verifier(request: pytest.FixtureRequest) -> Iterator[EmbeddedEngine]:
    from decoding.models import ModelSpec, load_engine

    batching = request.param == "batched"
    engine = load_engine(
        ModelSpec("verifier", "builtin:qwen2.5-coder-0.5b-instruct", dtype="float32",
                  batching=batching, speculation="none", kv_cache_mb=256)
    )  # fmt: skip
    yield engine
    engine.close()
    del engine
    release_memory()


def release_memory() -> None:
    """Hand the float32 verifier's freed memory back to the OS: later tests start a real vLLM,
    which sizes its KV cache from the RAM left (the suite was OOM-killed while this process kept
    the freed heap)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run(engine: EmbeddedEngine, case: tuple[str, str, Constraint, Any], hint: str = "",
        **params: Any) -> Choice:  # fmt: skip
    _, prompt, constraint, tools = case
    sampling = SamplingParams(**({"temperature": 0, "max_tokens": 96, "logprobs": True} | params))
    req = GenerationRequest(user(prompt), sampling, constraint, tools, draft_hint=hint)
    return engine.complete_sync(req).choices[0]


def assert_same(plain: Choice, hinted: Choice) -> None:
    assert hinted.token_ids == plain.token_ids
    assert hinted.text == plain.text
    assert hinted.finish_reason == plain.finish_reason
    for a, b in zip(plain.events, hinted.events, strict=True):
        assert abs(a.logprob - b.logprob) <= 1e-4
        assert a.forced == b.forced


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hinted_output_equals_plain(
    verifier: EmbeddedEngine, slm: EmbeddedEngine, case: tuple[str, str, Constraint, Any]
) -> None:
    plain = run(verifier, case)
    assert plain.hint is None

    own = run(verifier, case, hint=plain.text)
    assert_same(plain, own)
    assert own.hint is not None
    # Its own answer is reused whole but for the tokens the grammar forced or the model adds
    # after an accepted chunk, in far fewer passes than tokens.
    assert own.hint.reused >= len(plain.token_ids) // 2
    assert own.hint.passes < len(plain.token_ids) // 2

    small = run(slm, case)  # SmolLM2's answer: another tokenizer, another answer
    from_small = run(verifier, case, hint=small.text)
    assert_same(plain, from_small)
    assert from_small.hint is not None
    assert 0 <= from_small.hint.reused <= from_small.hint.drafted

    cut = len(plain.text) // 2
    corrupted = plain.text[:cut] + "\u2603 nothing like this" + plain.text[cut:]
    from_corrupted = run(verifier, case, hint=corrupted)
    assert_same(plain, from_corrupted)
    assert from_corrupted.hint is not None
    assert 0 < from_corrupted.hint.reused < own.hint.reused + 1


def test_hint_respects_max_tokens_and_stop(verifier: EmbeddedEngine) -> None:
    case = CASES[0]
    plain = run(verifier, case, max_tokens=12)
    hinted = run(verifier, case, hint=run(verifier, case).text, max_tokens=12)
    assert_same(plain, hinted)
    assert hinted.finish_reason == "length"
    assert len(hinted.token_ids) == 12

    stop = plain.text.split()[3]
    plain_stop = run(verifier, case, stop=[stop])
    hinted_stop = run(verifier, case, hint=plain.text, stop=[stop])
    assert hinted_stop.text == plain_stop.text
    assert hinted_stop.finish_reason == "stop"


def test_hint_under_sampling_keeps_the_seeded_output(verifier: EmbeddedEngine) -> None:
    """A seeded sampled request decodes with the coupled sampler whenever it has a draft, so
    its output depends on the seed only: the same with any hint (the hint changes passes)."""
    case = CASES[0]
    params = {"temperature": 0.8, "seed": 7}
    own = run(verifier, case, hint="The sky", **params)
    other = run(verifier, case, hint=run(verifier, case).text, **params)
    assert own.token_ids == other.token_ids


async def test_a_cascade_escalation_verifies_and_answers_as_the_top_tier_alone(
    verifier: EmbeddedEngine, slm: EmbeddedEngine
) -> None:
    """Through the router: SmolLM2 answers, the route escalates everything (threshold 1.0),
    and the verifier's answer equals what it says alone; the ledger row counts reused tokens."""
    from router.confidence import EarlyFallback
    from router.router import Route, Router, Trace

    backends = {"small": slm, "big": verifier}
    escalate_all = Route("esc", ("small", "big"), policy="cascade", signal="mean_prob",
                         threshold=1.0, early_fallback=EarlyFallback(enabled=False))  # fmt: skip
    router = Router(backends, {"esc": escalate_all})
    for case in CASES:
        _, prompt, constraint, tools = case
        req = GenerationRequest(user(prompt), SamplingParams(temperature=0, max_tokens=96),
                                constraint, tools, request_id="r", task_id="t")  # fmt: skip
        trace = Trace("r", "esc", "t")
        answer = await router.complete(router.plan(escalate_all, req, trace), req, trace)
        alone = run(verifier, case, max_tokens=96, logprobs=False)
        assert answer.backend.name == verifier.info.name
        assert answer.result.choices[0].token_ids == alone.token_ids
        small, big = trace.attempts[0], trace.attempts[-1]
        assert (small.outcome, big.outcome, big.hint_mode) == ("escalated", "accepted", "verified")
        assert big.hint_reused is not None
        assert 0 <= big.hint_reused <= (big.hint_drafted or 0)
