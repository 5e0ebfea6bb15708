"""Deferral features and the learned rule: pure, on literal inputs."""

from __future__ import annotations

import math
import random

import pytest

from decoding.constraint import JsonSchema, NoConstraint, ToolCalls, ToolSpec
from decoding.types import TokenEvent
from router.calibrate import auroc
from router.deferral import (
    DeferralRule,
    answer_features,
    fit_logistic,
    fit_rule,
    holdout_report,
    is_masked,
    kind_of,
    provenance,
    token_features,
)


def event(prob: float, entropy: float = 0.5, mass: float = 1.0, forced: bool = False) -> TokenEvent:
    return TokenEvent(0, 1, "x", math.log(prob), entropy, mass, forced)


def test_token_features_use_quantiles_of_the_models_own_choices() -> None:
    events = [event(p) for p in (0.9, 0.8, 0.5, 0.1, 0.99)] + [event(0.001, forced=True)]
    f = token_features(events, masked=False)
    assert f["lp_min"] == pytest.approx(math.log(0.1))  # the forced 0.001 is not the model's
    assert f["lp_q50"] == pytest.approx(math.log(0.8))
    assert f["lp_q10"] == pytest.approx(math.log(0.1) + 0.4 * (math.log(0.5) - math.log(0.1)))
    assert "agree_mean" not in f  # no grammar: agreement is undefined, not 1.0
    assert f["log_tokens"] == pytest.approx(math.log1p(6))


def test_agreement_only_where_a_grammar_masked_the_tokens() -> None:
    events = [event(0.9, mass=0.5), event(0.9, mass=1.0)]
    assert token_features(events, masked=True)["agree_min"] == 0.5
    assert is_masked(ToolCalls((ToolSpec("f"),)), guided=True, embedded=True)
    assert not is_masked(ToolCalls((ToolSpec("f"),)), guided=False, embedded=True)
    assert not is_masked(JsonSchema({}), guided=True, embedded=False)  # remote: no masks seen
    assert not is_masked(NoConstraint(), guided=True, embedded=True)


def test_no_logprobs_means_no_token_features() -> None:
    assert token_features([event(1.0, forced=True)], masked=True) == {}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([{"city": "Paris", "days": 14}], 1.0),
        ([{"city": "Lyon", "days": 14}], 0.5),  # an invented city
        ([{"amount": 1000000}], 1.0),  # written 1,000,000 in the text
        ([{"flag": True, "n": 3, "unit": ""}], None),  # nothing informative to check
        ([{"city": "paris  france"}], 1.0),  # case, spacing and punctuation do not matter
        ([{"city": "Par"}], 0.0),  # whole words only
        ([{"ids": [140, 7]}], 0.0),  # 140 is not there (1400 is), 7 says nothing
    ],
)
def test_provenance(args: list[dict[str, object]], expected: float | None) -> None:
    text = "Weather in Paris, France for 14 days? I have $1,000,000 and order 1400."
    assert provenance(args, text) == expected


def test_answer_features_read_calls_against_the_conversation() -> None:
    messages = [{"role": "user", "content": "Book Rome"}]
    f = answer_features([event(0.9)], masked=False, valid=True,
                        call_arguments=[{"city": "Oslo"}], messages=messages)  # fmt: skip
    assert f["provenance"] == 0.0
    assert f["valid"] == 1.0
    assert "provenance" not in answer_features([event(0.9)], masked=False, valid=False,
                                               call_arguments=None, messages=messages)  # fmt: skip


def test_answer_features_say_whether_a_tool_request_was_answered_without_a_call() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    text = answer_features([event(0.9)], masked=False, valid=True, call_arguments=None,
                           messages=messages, tools_offered=True)  # fmt: skip
    assert (text["abstained"], text["calls"]) == (1.0, 0.0)
    two = answer_features([event(0.9)], masked=False, valid=True, messages=messages,
                          call_arguments=[{"a": 1}, {"a": 2}], tools_offered=True)  # fmt: skip
    assert (two["abstained"], two["calls"]) == (0.0, 2.0)
    plain = answer_features([event(0.9)], masked=False, valid=True, call_arguments=None,
                            messages=messages)  # fmt: skip
    assert "abstained" not in plain
    assert "calls" not in plain


def test_kinds() -> None:
    assert kind_of(ToolCalls((ToolSpec("f"),))) == "tools"
    assert kind_of(JsonSchema({})) == "json"
    assert kind_of(NoConstraint()) == "text"


def synthetic(n: int, seed: int) -> list[tuple[dict[str, float], bool]]:
    """Success depends on provenance and the low logprob quantile; lp_q50 is noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prov, q10, q50 = rng.random(), -rng.random() * 5, -rng.random()
        ok = rng.random() < 1 / (1 + math.exp(-(4 * (prov - 0.5) + 1.5 * (q10 + 2.5))))
        rows.append(({"provenance": prov, "lp_q10": q10, "lp_q50": q50}, ok))
    return rows


def test_fitted_rule_separates_held_out_rows_better_than_any_single_signal() -> None:
    train, test = synthetic(400, 1), synthetic(400, 2)
    model = fit_logistic(train)
    combined = auroc([(model.p_success(v), ok) for v, ok in test])
    singles = [auroc([(v[f], ok) for v, ok in test]) for f in ("provenance", "lp_q10", "lp_q50")]
    assert combined is not None
    assert all(s is not None for s in singles)
    assert combined > max(s for s in singles if s is not None)
    weights = dict(zip(model.features, model.weights, strict=True))
    assert weights["provenance"] > 0
    assert weights["lp_q10"] > 0


def test_an_undefined_feature_never_counts_as_confident() -> None:
    model = fit_logistic(synthetic(400, 3))
    full = {"provenance": 0.9, "lp_q10": -0.5, "lp_q50": -0.2}
    without = {"lp_q10": -0.5, "lp_q50": -0.2}
    assert model.p_success(without) <= model.p_success(full)
    lowest = model.low[model.features.index("provenance")]
    assert model.p_success(without) == pytest.approx(
        model.p_success({**without, "provenance": lowest})
    )
    assert model.p_success({}) <= min(model.p_success(v) for v, _ in synthetic(50, 4)) + 1e-12


def test_rule_round_trips_and_picks_a_threshold_per_kind(tmp_path: object) -> None:
    rows = [("tools", v, ok) for v, ok in synthetic(300, 5)]
    rows += [("text", {"lp_q10": -1.0}, True)] * 3  # one class only: no text model
    rule, report = fit_rule(rows, min_success_rate=0.8)  # type: ignore[arg-type]
    assert report["tools"]["fitted"]
    assert not report["text"]["fitted"]
    assert report["tools"]["kept_success_rate"] >= 0.8
    assert rule.threshold("text") == 0.0
    assert rule.p_success("text", {}) is None
    path = f"{tmp_path}/rule.json"
    rule.save(path)
    again = DeferralRule.load(path)
    values = {"provenance": 0.3, "lp_q10": -2.0}
    assert again.p_success("tools", values) == pytest.approx(rule.p_success("tools", values))
    assert again.threshold("tools") == rule.threshold("tools") > 0


def test_bad_rule_files_are_refused() -> None:
    with pytest.raises(ValueError, match="not a deferral rule"):
        DeferralRule.from_dict({"models": {}})
    with pytest.raises(ValueError, match="unknown kind"):
        DeferralRule.from_dict({"deferral_rule": 1, "models": {"audio": {}}})


def test_holdout_report_scores_the_rule_next_to_each_signal_on_unseen_rows() -> None:
    rule, _ = fit_rule([("tools", v, ok) for v, ok in synthetic(400, 6)], min_success_rate=0.8)
    held = [("tools", v, ok) for v, ok in synthetic(300, 7)]
    held += [("text", {"lp_q10": -1.0}, True), ("text", {"lp_q10": -3.0}, False)]
    report = holdout_report(rule, held, signals=("mean_prob",))  # type: ignore[arg-type]
    tools = report["tools"]
    assert tools["rows"] == 300
    single = tools["single"]
    assert set(single) == {"provenance", "lp_q10", "lp_q50"}  # only features the rows define
    assert tools["rule_auroc"] == pytest.approx(
        auroc([(rule.p_success("tools", v) or 0.0, ok) for _, v, ok in held[:300]])
    )
    assert tools["rule_auroc"] > max(a for a in single.values() if a is not None)
    threshold = rule.threshold("tools")
    kept = [ok for _, v, ok in held[:300] if (rule.p_success("tools", v) or 0) >= threshold]
    assert tools["kept_success_rate"] == pytest.approx(sum(kept) / len(kept))
    assert tools["fallback_rate"] == pytest.approx(1 - len(kept) / 300)
    # no text model: only the single signals, which still rank the text rows
    assert "rule_auroc" not in report["text"]
    assert report["text"]["single"] == {"lp_q10": 1.0}
