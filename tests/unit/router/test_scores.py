"""Pure routing math: confidence signals, early-fallback watch, calibration, pre-router, cost."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decoding.backend import BackendInfo
from decoding.constraint import JsonSchema, ToolCalls, ToolSpec
from decoding.types import GenerationRequest, TokenEvent
from router.calibrate import auroc, calibrate, calibrate_all, rates_at
from router.confidence import (
    CollapseWatch,
    EarlyFallback,
    combined_signals,
    confidence,
    repeating_cycle,
    signals_of,
)
from router.cost import attempt_cost, cost_per_success, counterfactual_cost
from router.pre import PreRouter, features_of, fit


def ev(prob: float, entropy: float = 0.5, mass: float = 1.0, forced: bool = False,
       token: int = 0) -> TokenEvent:  # fmt: skip
    return TokenEvent(0, token, "x", math.log(prob), entropy, mass, forced)


def test_signals_of_literal_events() -> None:
    events = [ev(0.5, 1.0, 0.9), ev(0.8, 0.2, 0.7), ev(1.0, 0.0, 1.0, forced=True)]
    s = signals_of(events)
    assert s["mean_prob"] == pytest.approx(math.sqrt(0.5 * 0.8))
    assert s["min_prob"] == pytest.approx(0.5)
    assert s["mean_entropy"] == pytest.approx(math.exp(-0.6))
    assert s["max_entropy"] == pytest.approx(math.exp(-1.0))
    assert s["grammar_agreement"] == pytest.approx(0.8)
    assert s["min_grammar_agreement"] == pytest.approx(0.7)
    assert s["scored_tokens"] == 2
    assert confidence(s, "min_prob") == pytest.approx(0.5)


def test_all_forced_output_has_no_signals() -> None:
    assert signals_of([ev(1.0, forced=True)]) == {}
    assert confidence({}, "mean_prob") is None
    with pytest.raises(ValueError, match="unknown confidence signal"):
        confidence({}, "vibes")


def test_combined_signals_takes_the_least_confident_choice() -> None:
    a = {"mean_prob": 0.9, "min_prob": 0.2}
    b = {"mean_prob": 0.4, "min_prob": 0.3}
    assert combined_signals([a, b, {}]) == {"mean_prob": 0.4, "min_prob": 0.2}


@given(st.lists(st.floats(0.001, 1.0), min_size=1, max_size=30))
def test_signals_stay_in_unit_interval(probs: list[float]) -> None:
    s = signals_of([ev(p, entropy=-math.log(p)) for p in probs])
    for name, value in s.items():
        if name != "scored_tokens":
            assert 0.0 <= value <= 1.0 + 1e-12


def test_repeating_cycle() -> None:
    assert repeating_cycle([9, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], 4, 8) == 3
    assert repeating_cycle([1, 2, 3, 1, 2, 3, 1, 2, 3], 4, 8) is None  # only 3 cycles
    assert repeating_cycle([5] * 20, 4, 8) is None  # one repeated token is not a cycle here
    assert repeating_cycle([1, 2] * 4, 4, 1 + 1) == 2


def test_collapse_watch_needs_min_tokens_and_a_full_window() -> None:
    watch = CollapseWatch(EarlyFallback(window=3, min_window_prob=0.1, min_tokens=5))
    reasons = [watch.push(ev(0.01, token=i)) for i in range(6)]
    assert reasons == [None, None, None, None, "confidence_collapse", "confidence_collapse"]
    off = CollapseWatch(EarlyFallback(enabled=False))
    assert all(off.push(ev(0.001, token=i)) is None for i in range(20))


def test_forced_tokens_do_not_fill_the_window() -> None:
    watch = CollapseWatch(EarlyFallback(window=2, min_window_prob=0.1, min_tokens=0))
    assert watch.push(ev(0.01, token=1)) is None
    assert watch.push(ev(1.0, forced=True, token=2)) is None  # forced: not scored
    assert watch.push(ev(0.01, token=3)) == "confidence_collapse"


ROWS = [(0.1, False), (0.2, False), (0.3, True), (0.6, False), (0.7, True), (0.9, True)]


def test_rates_at_threshold() -> None:
    assert rates_at(ROWS, 0.0) == (0.0, 0.5)
    fallback, kept = rates_at(ROWS, 0.3)
    assert fallback == pytest.approx(2 / 6)
    assert kept == pytest.approx(3 / 4)
    assert rates_at(ROWS, 1.0) == (1.0, None)


def test_calibrate_to_a_fallback_budget() -> None:
    cal = calibrate(ROWS, signal="mean_prob", max_fallback_rate=0.5)
    assert cal.threshold == 0.6  # escalates 0.1, 0.2, 0.3 (3 of 6 rows)
    assert cal.fallback_rate == pytest.approx(0.5)
    assert cal.kept_success_rate == pytest.approx(2 / 3)
    assert cal.met
    assert cal.slm_success_rate == pytest.approx(0.5)


def test_calibrate_to_a_success_target() -> None:
    cal = calibrate(ROWS, signal="mean_prob", min_success_rate=0.75)
    assert cal.threshold == 0.3
    assert cal.fallback_rate == pytest.approx(1 / 3)
    perfect = calibrate(ROWS, signal="mean_prob", min_success_rate=1.0)
    assert perfect.threshold == 0.7
    assert perfect.kept_success_rate == 1.0
    impossible = calibrate([(0.5, False)], signal="mean_prob", min_success_rate=0.9)
    assert not impossible.met
    assert impossible.fallback_rate == 1.0


def test_calibrate_needs_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(ROWS, signal="mean_prob")
    with pytest.raises(ValueError, match="no labelled rows"):
        calibrate([], signal="mean_prob", max_fallback_rate=0.1)


def test_auroc() -> None:
    assert auroc([(0.1, False), (0.9, True)]) == 1.0
    assert auroc([(0.9, False), (0.1, True)]) == 0.0
    assert auroc([(0.5, False), (0.5, True)]) == 0.5
    assert auroc(ROWS) == pytest.approx(8 / 9)  # 0.3 beats two failures, 0.7 and 0.9 all three
    assert auroc([(0.5, True)]) is None


def test_calibrate_all_ranks_signals_by_auroc() -> None:
    labelled = [({"mean_prob": s, "min_prob": 1 - s}, ok) for s, ok in ROWS]
    results = calibrate_all(labelled, max_fallback_rate=0.3)
    assert [c.signal for c in results] == ["mean_prob", "min_prob"]


def tool_request(n_tools: int) -> GenerationRequest:
    tools = tuple(
        {"type": "function", "function": {"name": f"f{i}", "parameters": {
            "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}
        for i in range(n_tools)
    )  # fmt: skip
    specs = tuple(ToolSpec(f"f{i}", t["function"]["parameters"]) for i, t in enumerate(tools))
    return GenerationRequest(({"role": "user", "content": "hello"},), tools=tools,
                             constraint=ToolCalls(specs, parallel=True))  # fmt: skip


def test_features_of_a_tool_request() -> None:
    f = features_of(tool_request(2))
    assert f["tools"] == 2
    assert f["tool_params"] == 2
    assert f["required_fields"] == 2
    assert f["wants_tools"] == 1
    assert f["parallel"] == 1
    assert f["wants_json"] == 0
    assert f["schema_nodes"] == pytest.approx(math.log1p(4))
    schema = GenerationRequest(({"role": "user", "content": "x"},),
                               constraint=JsonSchema({"type": "object"}))  # fmt: skip
    assert features_of(schema)["wants_json"] == 1


def test_pre_router_fit_learns_the_direction(tmp_path: object) -> None:
    rows = [(features_of(tool_request(n)), n <= 2) for n in range(1, 7) for _ in range(5)]
    weights = fit(rows)
    assert weights["tools"] < 0
    router = PreRouter(weights, threshold=0.5, trained_on=len(rows))
    assert router.small_is_enough(tool_request(1))[0]
    assert not router.small_is_enough(tool_request(6))[0]
    path = tmp_path / "pre.json"  # type: ignore[operator]
    router.save(path)
    assert PreRouter.load(path) == router


def test_costs() -> None:
    slm = BackendInfo("slm", "slm", "m", 1, True, True, price_in_per_mtok=0.02,
                      price_out_per_mtok=0.04)  # fmt: skip
    llm = BackendInfo("llm", "llm", "m", 1, True, True, price_in_per_mtok=0.08,
                      price_out_per_mtok=0.16)  # fmt: skip
    assert attempt_cost(slm, 1_000_000, 500_000) == pytest.approx(0.04)
    assert counterfactual_cost(llm, 1_000_000, 500_000) == pytest.approx(0.16)
    assert cost_per_success(1.0, 4) == 0.25
    assert cost_per_success(1.0, 0) is None
