"""Route and ledger settings in the typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfig, from_mapping, load_config
from router.deferral import BUNDLED_RULE_PATH, DeferralRule
from router.pre import PreRouter


def test_default_routes_are_a_calibrated_cascade_and_a_pre_router() -> None:
    config = GatewayConfig()
    assert [(m.name, m.source, m.tier) for m in config.models] == [
        ("slm", "builtin:qwen2.5-coder-0.5b-instruct", "slm"),
        ("llm", "builtin:qwen2.5-coder-1.5b-instruct", "llm"),
        ("tiny", "builtin:smollm2-135m-instruct", "tiny"),
    ]
    routes = {r.name: r for r in config.routes}
    assert routes["auto"].policy == "cascade"
    assert routes["auto"].tiers == ("slm", "llm")
    assert routes["auto"].signal == "min_grammar_agreement"  # kinds the rule does not cover
    assert routes["auto"].threshold == pytest.approx(0.9986)
    rule = routes["auto"].deferral
    assert rule is not None
    assert rule.covers("tools")
    assert not rule.covers("text")
    assert 0.0 < rule.threshold("tools") < 1.0
    assert routes["pre"].policy == "pre"


def test_a_route_can_name_the_bundled_deferral_rule() -> None:
    config = from_mapping({"routes": [{"name": "mine", "tiers": ["slm", "llm"],
                                       "policy": "cascade", "deferral": "default"}]})  # fmt: skip
    (mine,) = config.routes
    assert mine.deferral == DeferralRule.load(BUNDLED_RULE_PATH)


def test_route_settings_are_parsed(tmp_path: Path) -> None:
    pre_file = tmp_path / "pre.json"
    PreRouter({"bias": 1.0}, threshold=0.7, trained_on=3).save(pre_file)
    config = from_mapping({
        "routes": [
            {"name": "auto", "tiers": ["slm", "llm"], "policy": "cascade", "signal": "min_prob",
             "threshold": 0.2, "early_fallback": {"window": 4, "repeat_cycles": 3},
             "speculation": "suffix", "stream_commit_tokens": 8},
            {"name": "fast", "tiers": ["slm", "llm"], "policy": "pre", "pre": str(pre_file)},
            {"name": "inline", "tiers": ["slm", "llm"], "policy": "pre_cascade",
             "pre": {"weights": {"tools": -2.0}, "threshold": 0.4}},
        ],
    })  # fmt: skip
    auto, fast, inline = config.routes
    assert (auto.signal, auto.threshold, auto.speculation) == ("min_prob", 0.2, "suffix")
    assert (auto.early_fallback.window, auto.early_fallback.repeat_cycles) == (4, 3)
    assert fast.pre == PreRouter({"bias": 1.0}, threshold=0.7, trained_on=3)
    assert inline.pre.weights["tools"] == -2.0
    assert inline.pre.threshold == 0.4


@pytest.mark.parametrize(("route", "message"), [
    ({"name": "x", "tiers": ["slm"], "policy": "cascade"}, "needs two tiers"),
    ({"name": "x", "tiers": ["slm", "llm"], "signal": "vibes"}, "unknown signal"),
    ({"name": "x", "tiers": ["slm", "llm"], "threshold": 2}, "threshold"),
    ({"name": "x", "tiers": ["slm"], "colour": "red"}, "unknown keys"),
    ({"name": "x", "tiers": ["nope"]}, "unknown models"),
])  # fmt: skip
def test_bad_routes_are_refused(route: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_mapping({"routes": [route]})


def test_ledger_url(tmp_path: Path) -> None:
    assert GatewayConfig(ledger_url="off").resolved_ledger_url() is None
    default = GatewayConfig(cache_dir=str(tmp_path)).resolved_ledger_url()
    assert default == f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    env = {"SLMGATE_LEDGER_URL": "postgresql+psycopg://db/x"}
    assert load_config(None, env).resolved_ledger_url() == "postgresql+psycopg://db/x"
