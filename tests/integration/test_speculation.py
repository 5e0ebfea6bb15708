"""Speculation on the real SLM (float32): every drafter's greedy output equals plain decoding's.

Token ids, finish reasons, logprobs (1e-4) and constrained validity must match plain decoding
for free text, JSON schemas and tool calls; stop strings and max_tokens cut at the same token;
the per-choice SpecStats add up. Each prompt runs twice per drafter, so the second run drafts
from the engine's global index (which then holds the first output): long accepted runs are
exercised as well as misses.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from decoding.constraint import Constraint, JsonObject, JsonSchema, NoConstraint, ToolCalls
from decoding.engine import EmbeddedEngine
from decoding.types import Choice, GenerationRequest, SamplingParams
from decoding.validate import check_output
from schemas.errors import InvalidRequestError
from spec.draft import Draft
from tests.integration.test_engine import TIME, WEATHER, sample_schemas, spec, user

pytestmark = pytest.mark.slow

DRAFTERS = ("suffix", "stand", "both")

CASES: list[tuple[str, str, Constraint, tuple[dict[str, Any], ...]]] = [
    ("repeat", "Repeat this list twice: apple, banana, cherry, date.", NoConstraint(), ()),
    ("code", "Write a Python function add(a, b) and a test for it.", NoConstraint(), ()),
    ("json-object", "Describe a cat as a JSON object with a name and an age.", JsonObject(), ()),
    *[
        (name, f"Produce one JSON instance of this schema:\n{json.dumps(schema)}",
         JsonSchema(schema), ())
        for name, schema in sample_schemas(2)
    ],
    ("tool-required", "What's the weather in Paris, in celsius?",
     ToolCalls((spec(WEATHER), spec(TIME)), mode="required", parallel=True), (WEATHER, TIME)),
    ("tool-auto", "What time is it in Tokyo?",
     ToolCalls((spec(WEATHER), spec(TIME)), mode="auto", parallel=False), (WEATHER, TIME)),
]  # fmt: skip


def run(
    engine: EmbeddedEngine, case: tuple[str, str, Constraint, Any], mode: str, **params: Any
) -> Choice:
    _, prompt, constraint, tools = case
    sampling = SamplingParams(**({"temperature": 0, "max_tokens": 64, "logprobs": True} | params))
    req = GenerationRequest(user(prompt), sampling, constraint, tools, speculation=mode)  # type: ignore[arg-type]
    return engine.complete_sync(req).choices[0]


def assert_same(plain: Choice, fast: Choice) -> None:
    assert fast.token_ids == plain.token_ids
    assert fast.text == plain.text
    assert fast.finish_reason == plain.finish_reason
    for a, b in zip(plain.events, fast.events, strict=True):
        assert abs(a.logprob - b.logprob) <= 1e-4
        assert abs(a.entropy - b.entropy) <= 1e-3
        assert abs(a.allowed_mass - b.allowed_mass) <= 1e-4
        assert a.forced == b.forced


def assert_consistent(choice: Choice, drafter: str) -> None:
    stats = choice.spec
    assert stats is not None
    assert stats.drafter == drafter
    assert 0 <= stats.accepted <= stats.drafted
    assert sum(stats.histogram) == stats.steps
    assert sum((i + 1) * n for i, n in enumerate(stats.histogram)) == len(choice.token_ids)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_greedy_output_is_identical_with_every_drafter(
    slm: EmbeddedEngine, case: tuple[str, str, Constraint, Any]
) -> None:
    plain = run(slm, case, "none")
    assert plain.spec is None
    if not isinstance(case[2], NoConstraint) and plain.finish_reason == "stop":
        assert check_output(case[2], plain.text).valid
    accepted = 0
    for drafter in DRAFTERS:
        for _ in range(2):  # the second run drafts from the first one's output
            fast = run(slm, case, drafter)
            assert_same(plain, fast)
            assert_consistent(fast, drafter)
            accepted += fast.spec.accepted if fast.spec else 0
    assert accepted > 0  # speculation did take effect


def test_stop_strings_and_max_tokens_cut_at_the_same_token(slm: EmbeddedEngine) -> None:
    case = ("count", "Count from 1 to 20, comma separated.", NoConstraint(), ())
    full = run(slm, case, "none", max_tokens=48)
    cut = full.text.index(",", 4)
    stop = full.text[cut : cut + 3]
    for max_tokens in (1, 2, 7, 13):
        plain = run(slm, case, "none", max_tokens=max_tokens)
        for drafter in DRAFTERS:
            fast = run(slm, case, drafter, max_tokens=max_tokens)
            assert_same(plain, fast)
            assert (fast.finish_reason, len(fast.token_ids)) == ("length", max_tokens)
    plain = run(slm, case, "none", max_tokens=48, stop=(stop,))
    assert plain.finish_reason == "stop"
    assert stop not in plain.text
    for drafter in DRAFTERS:
        for _ in range(2):
            fast = run(slm, case, drafter, max_tokens=48, stop=(stop,))
            assert_same(plain, fast)
            assert_consistent(fast, drafter)


def test_seeded_sampling_is_reproducible_while_drafters_learn(slm: EmbeddedEngine) -> None:
    """Sampled tokens depend on the seed only, not on what the (learning) drafters propose."""
    case = CASES[0]
    params = {"temperature": 0.8, "top_p": 0.95, "seed": 3, "max_tokens": 40}
    first = run(slm, case, "suffix", **params)
    again = [run(slm, case, drafter, **params) for drafter in ("suffix", "both", "stand")]
    assert all(c.token_ids == first.token_ids for c in again)
    assert again[0].spec is not None
    assert again[0].spec.accepted > 0
    assert run(slm, case, "suffix", **(params | {"seed": 4})).token_ids != first.token_ids


def test_constrained_sampling_with_speculation_validates(slm: EmbeddedEngine) -> None:
    case = CASES[5]  # tool call, required
    for seed in range(3):
        choice = run(slm, case, "both", temperature=1.0, seed=seed, max_tokens=120)
        if choice.finish_reason == "stop":
            assert check_output(case[2], choice.text).valid, choice.text
        assert_consistent(choice, "both")


def test_unknown_speculation_is_a_400_before_generation(slm: EmbeddedEngine) -> None:
    req = GenerationRequest(user("hi"), SamplingParams(temperature=0, max_tokens=4),
                            speculation="sometimes")  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(InvalidRequestError) as info:
        slm.prepare(req)
    assert info.value.param == "speculation"
    assert slm.speculation_for(GenerationRequest(user("hi"))) == "suffix"  # float32: auto


class DecoyTreeDrafter:
    """Knows plain decoding's output and drafts trees whose first branch is always wrong.

    Each proposal puts a decoy root (with a decoy child) first, then the true continuation as
    a second root path with a decoy sibling under its first node, so every accepted run sits
    on a later branch: the engine must walk the tree, not the first path, and gather the
    accepted branch's cache rows into place (a wrong gather changes the next logits).
    """

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.truth: dict[tuple[int, ...], list[int]] = {}
        self.prompts: dict[object, tuple[int, ...]] = {}

    def start(self, req_id: object, prompt_ids: Any) -> None:
        self.prompts[req_id] = tuple(prompt_ids)

    def extend(self, req_id: object, token_ids: Any) -> None:
        pass

    def propose(self, req_id: object, context_ids: Any, k: int) -> Draft:
        prompt = self.prompts[req_id]
        done = len(context_ids) - len(prompt)
        truth = self.truth.get(prompt, [])[done : done + max(0, k - 3)]
        if not truth:
            return Draft.empty()
        decoy = (truth[0] + 1) % self.vocab
        tokens = [decoy, (decoy + 1) % self.vocab, truth[0]]
        parents = [-1, 0, -1]
        if len(truth) > 1:
            tokens.append((truth[1] + 1) % self.vocab)
            parents.append(2)
        for i, token in enumerate(truth[1:]):
            tokens.append(token)
            parents.append(2 if i == 0 else len(tokens) - 2)
        return Draft(tuple(tokens), tuple(parents), tuple(0.5 for _ in tokens))

    def stop(self, req_id: object) -> None:
        self.prompts.pop(req_id)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=["text", "schema", "tools"])
def test_tree_drafts_are_verified_on_their_accepted_branch(
    slm: EmbeddedEngine, case: tuple[str, str, Constraint, Any]
) -> None:
    plain = run(slm, case, "none")
    oracle = DecoyTreeDrafter(slm.vocab_size)
    prompt = slm.prepare(
        GenerationRequest(user(case[1]), constraint=case[2], tools=case[3])
    ).prompt_ids
    oracle.truth[tuple(prompt)] = list(plain.token_ids)
    slm.drafters.add("decoy-tree", oracle)
    try:
        fast = run(slm, case, "decoy-tree")
    finally:
        del slm.drafters.drafters["decoy-tree"]
    assert_same(plain, fast)
    assert_consistent(fast, "decoy-tree")
    assert fast.spec is not None
    # Most output tokens arrived as accepted drafts on a second branch (or as grammar-forced
    # text, which is emitted without drafting), so few passes were needed.
    forced = sum(e.forced for e in fast.events)
    assert fast.spec.accepted + forced >= len(plain.token_ids) // 2
    assert fast.spec.steps < len(plain.token_ids) // 3
