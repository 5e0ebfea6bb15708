"""Compute-priced tiers: attempt cost from the seconds an attempt used, the counterfactual when
the top tier is compute-priced, and what an attempt records. Literal numbers throughout."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from decoding.backend import BackendInfo, FinishEvent
from decoding.models import ModelSpec
from decoding.types import GenerationRequest, TokenEvent
from router.attempt import compute_of
from router.cost import MIN_RATE_OBSERVATIONS, ComputeRate, attempt_cost, counterfactual_cost
from router.router import Router, request_record
from router.router import Trace as RouterTrace
from tests.unit.router.test_tier_loop import CASCADE, SINGLE, Tier, decide, request

# 2 cores at $0.0504 per core-hour: $0.1008 per hour of the engine's compute
CPU_2 = BackendInfo("slm", "slm", "m", 1, True, True, compute_price_per_hour=0.1008,
                    compute_cores=2)  # fmt: skip
PER_TOKEN = BackendInfo("llm", "llm", "m", 1, True, True, price_in_per_mtok=1.0,
                        price_out_per_mtok=2.0)  # fmt: skip


def test_compute_priced_attempt_costs_its_seconds_not_its_tokens() -> None:
    assert attempt_cost(CPU_2, 1_000, 100, compute_s=1800.0) == pytest.approx(0.0504)
    assert attempt_cost(CPU_2, 1_000_000, 1_000_000, compute_s=0.0) == 0.0
    assert attempt_cost(PER_TOKEN, 1_000_000, 500_000, compute_s=99.0) == pytest.approx(2.0)


def test_counterfactual_of_a_compute_priced_top_is_known_only_from_its_own_answer() -> None:
    assert counterfactual_cost(CPU_2, 1_000, 100) is None
    assert counterfactual_cost(CPU_2, 1_000, 100, top_answer_cost=0.003) == 0.003
    assert counterfactual_cost(PER_TOKEN, 1_000_000, 500_000) == pytest.approx(2.0)
    assert counterfactual_cost(PER_TOKEN, 1_000_000, 500_000, 0.5) == pytest.approx(2.0)


def test_compute_of_sums_finished_choices_and_bounds_cut_off_ones() -> None:
    finish = [FinishEvent(0, "stop", compute_s=0.25), FinishEvent(1, "stop", compute_s=0.5)]
    token = TokenEvent(0, 5, "x", -0.1, 0.1, 1.0, False)
    assert compute_of([token, *finish], 2, 9.0, priced=True) == 0.75
    # one choice of two cut off: booked at the attempt's wall time, never free
    assert compute_of([token, finish[0]], 2, 9.0, priced=True) == 9.0
    assert compute_of([token], 1, 9.0, priced=True) == 9.0
    # nothing measured (a remote backend): unknown
    assert compute_of([token, FinishEvent(0, "stop")], 1, 9.0, priced=False) is None
    assert compute_of([token], 1, 9.0, priced=False) is None
    # a token-priced engine still reports what it used
    assert compute_of([finish[0]], 1, 9.0, priced=False) == 0.25


def test_model_spec_compute_price_per_hour() -> None:
    builtin = ModelSpec("x", "builtin:smollm2-135m-instruct")
    assert builtin.resolved_prices() == (0.0, 0.0)  # no invented per-token default
    assert builtin.compute_price_per_hour("cpu", 4) == pytest.approx(4 * 0.0504)
    assert builtin.compute_price_per_hour("cuda:0", 16) == 3.0
    own = dataclasses.replace(builtin, price_per_core_hour=0.1, price_per_gpu_hour=2.5)
    assert own.compute_price_per_hour("cpu", 4) == pytest.approx(0.4)
    assert own.compute_price_per_hour("cuda", 4) == 2.5
    priced = dataclasses.replace(builtin, price_out_per_mtok=1.0)  # a per-token price wins
    assert priced.compute_price_per_hour("cpu", 4) is None
    assert priced.resolved_prices() == (0.0, 1.0)
    with pytest.raises(ValueError, match="prices must be >= 0"):
        ModelSpec("x", "builtin:smollm2-135m-instruct", price_per_core_hour=-1.0)
    with pytest.raises(ValueError, match="are for embedded and vllm models"):
        ModelSpec("x", kind="litellm", remote_model="gpt-4o-mini", price_per_gpu_hour=1.0)


class ComputeTier(Tier):
    """A scripted tier priced at ``per_hour`` $ of compute, each choice using ``seconds``."""

    def __init__(self, name: str, text: str, prob: float, *, per_hour: float, seconds: float):
        super().__init__(name, text, prob, prompt=7)
        self.info = dataclasses.replace(
            self.info, price_in_per_mtok=0.0, price_out_per_mtok=0.0,
            compute_price_per_hour=per_hour, compute_cores=1,
        )  # fmt: skip
        self.seconds = seconds

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        async for event in super().generate(req, prepared):
            if isinstance(event, FinishEvent):
                event = dataclasses.replace(event, compute_s=self.seconds)
            yield event


async def test_slm_answer_under_a_compute_priced_top_claims_no_saving() -> None:
    slm = ComputeTier("slm", "fine", 0.9, per_hour=36.0, seconds=2.0)  # $0.01 a second
    llm = ComputeTier("llm", "other", 0.9, per_hour=360.0, seconds=1.0)
    answer, _, trace = await decide("complete", CASCADE, slm, llm)
    assert answer.backend.name == "slm"
    assert trace.attempts[0].compute_s == 2.0
    assert trace.attempts[0].cost_usd == pytest.approx(0.02)
    assert answer.cost_usd == pytest.approx(0.02)
    assert answer.counterfactual_cost_usd == pytest.approx(0.02)  # unknown: its own cost
    record = request_record(trace, request(), answer=answer)
    assert record.cost_usd == pytest.approx(0.02)
    assert record.counterfactual_cost_usd == pytest.approx(0.02)


async def test_top_tier_answer_is_its_own_counterfactual() -> None:
    slm = ComputeTier("slm", "maybe", 0.3, per_hour=36.0, seconds=2.0)  # unsure: escalates
    llm = ComputeTier("llm", "surely", 0.9, per_hour=360.0, seconds=1.0)  # $0.1 a second
    answer, _, trace = await decide("complete", CASCADE, slm, llm)
    assert answer.backend.name == "llm"
    assert [(a.outcome, a.compute_s) for a in trace.attempts] == [("escalated", 2.0),
                                                                   ("accepted", 1.0)]  # fmt: skip
    assert [a.cost_usd for a in trace.attempts] == pytest.approx([0.02, 0.1])
    assert answer.cost_usd == pytest.approx(0.12)
    assert answer.counterfactual_cost_usd == pytest.approx(0.1)


async def test_per_token_top_prices_the_compute_priced_answer_by_tokens() -> None:
    slm = ComputeTier("slm", "fine", 0.9, per_hour=36.0, seconds=2.0)
    llm = Tier("llm", "other", price=1.0)  # $1 in, $2 out per 1M tokens
    answer, _, trace = await decide("complete", CASCADE, slm, llm)
    assert answer.backend.name == "slm"
    assert answer.counterfactual_cost_usd == pytest.approx((7 * 1.0 + 4 * 2.0) / 1e6)
    assert trace.attempts[0].cost_usd == pytest.approx(0.02)


async def test_per_token_tier_records_no_compute() -> None:
    answer, _, trace = await decide("complete", CASCADE, Tier("slm", "fine"), Tier("llm", "x"))
    assert answer.backend.name == "slm"
    assert trace.attempts[0].compute_s is None


def rate_of(rows: list[tuple[int, int, float]]) -> ComputeRate:
    rate = ComputeRate()
    for p, c, cost in rows:
        rate.observe(p, c, cost)
    return rate


def test_compute_rate_recovers_per_token_costs_exactly() -> None:
    # cost = 1e-6 per prompt token + 5e-5 per completion token, sizes varied independently
    rows = [(p, c, 1e-6 * p + 5e-5 * c) for p in (100, 400, 900) for c in (10, 40, 70)]
    rate = rate_of(rows)
    a, b = rate.rates()
    assert (a, b) == (pytest.approx(1e-6), pytest.approx(5e-5))
    assert rate.estimate(500, 20) == pytest.approx(5e-4 + 1e-3)


def test_compute_rate_is_unknown_until_enough_attempts() -> None:
    rows = [(100 * i, 10 * i, 0.001 * i) for i in range(1, MIN_RATE_OBSERVATIONS)]
    assert rate_of(rows).estimate(100, 10) is None
    assert rate_of([*rows, (50, 5, 0.0005)]).estimate(100, 10) is not None


def test_compute_rate_never_goes_negative() -> None:
    # cost falls as prompts grow (cached prompts are cheap): no negative price per prompt token
    rows = [(1000, 10, 0.010), (200, 10, 0.012), (800, 20, 0.019), (100, 20, 0.022)] * 2
    a, b = rate_of(rows).rates()
    assert a == 0.0
    assert b > 0
    # one size only (collinear): one rate carries it
    a, b = rate_of([(100, 10, 0.01)] * 8).rates()
    assert a * 100 + b * 10 == pytest.approx(0.01)
    assert ComputeRate().rates() == (0.0, 0.0)


def test_counterfactual_of_a_compute_priced_top_is_estimated_from_its_rate() -> None:
    rate = rate_of([(p, c, 1e-6 * p + 1e-4 * c) for p in (10, 30) for c in (1, 2, 3, 4)])
    assert counterfactual_cost(CPU_2, 1_000, 10, top_rate=rate) == pytest.approx(2e-3)
    assert counterfactual_cost(CPU_2, 1_000, 10, top_answer_cost=0.5, top_rate=rate) == 0.5
    assert counterfactual_cost(CPU_2, 1_000, 10, top_rate=ComputeRate()) is None


async def test_slm_answer_is_priced_at_the_top_tiers_measured_rate_once_it_has_one() -> None:
    slm = ComputeTier("slm", "fine", 0.9, per_hour=36.0, seconds=2.0)  # $0.02 an attempt
    llm = ComputeTier("llm", "other", 0.9, per_hour=360.0, seconds=1.0)  # $0.1 an attempt
    router = Router({"slm": slm, "llm": llm}, {})
    llm_only = dataclasses.replace(SINGLE, tiers=("llm",))
    for i in range(MIN_RATE_OBSERVATIONS):  # the top tier answers alone: its rate is measured
        trace = RouterTrace(f"r{i}", "llm", f"t{i}")
        await router.complete(router.plan(llm_only, request(), trace), request(), trace)
    trace = RouterTrace("kept", "auto", "k")
    answer = await router.complete(router.plan(CASCADE, request(), trace), request(), trace)
    assert answer.backend.name == "slm"
    assert answer.cost_usd == pytest.approx(0.02)
    # same prompt (7 tokens) and length (4) as the top tier's answers: its cost, $0.1
    assert answer.counterfactual_cost_usd == pytest.approx(0.1)
    assert answer.counterfactual_estimated
