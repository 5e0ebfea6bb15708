"""A real SmolLM2 answer is priced by the compute it used: the engine measures its worker
seconds, and the attempt costs compute_s x cores x price per core-hour / 3600 (on CPU)."""

from __future__ import annotations

from typing import Any

import pytest

from decoding.models import DEFAULT_PRICE_PER_CORE_HOUR, DEFAULT_PRICE_PER_GPU_HOUR
from decoding.types import GenerationRequest, SamplingParams
from router.router import Route, Router, Trace

pytestmark = pytest.mark.slow


async def test_smollm2_answer_costs_its_compute(slm: Any) -> None:
    info = slm.info
    assert (info.price_in_per_mtok, info.price_out_per_mtok) == (0.0, 0.0)
    assert info.compute_cores >= 1
    per_hour = (DEFAULT_PRICE_PER_GPU_HOUR if info.device.startswith("cuda")
                else info.compute_cores * DEFAULT_PRICE_PER_CORE_HOUR)  # fmt: skip
    assert info.compute_price_per_hour == pytest.approx(per_hour)
    route = Route("slm", ("slm",))
    router = Router({"slm": slm}, {})
    params = SamplingParams(temperature=0.0, max_tokens=8)
    req = GenerationRequest(({"role": "user", "content": "Say hello."},), params, request_id="r1")
    trace = Trace("r1", route.name)
    answer = await router.complete(router.plan(route, req, trace), req, trace)
    assert answer.result.completion_tokens > 0
    assert answer.result.compute_s > 0
    (attempt,) = trace.attempts
    assert attempt.compute_s == answer.result.compute_s
    assert attempt.cost_usd == pytest.approx(attempt.compute_s * per_hour / 3600, rel=1e-12)
    assert answer.cost_usd == attempt.cost_usd
    assert answer.counterfactual_cost_usd == attempt.cost_usd  # the top tier answered itself
