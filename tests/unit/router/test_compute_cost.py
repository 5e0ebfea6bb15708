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
from router.cost import attempt_cost, counterfactual_cost
from router.router import request_record
from tests.unit.router.test_tier_loop import CASCADE, Tier, decide, request

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
    with pytest.raises(ValueError, match="are for embedded models"):
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
