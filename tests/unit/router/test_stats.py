"""The stats helpers on literals: window parsing, percentiles, rates, CPS, buckets, series."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as hs

from router import stats as st

# ---- parse_window -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("30s", 30.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("2w", 1209600.0),
        ("1.5h", 5400.0),
        (" 10M ", 600.0),
        (120, 120.0),
        (2.5, 2.5),
    ],
)
def test_parse_window_units(text: str | float, seconds: float) -> None:
    assert st.parse_window(text) == seconds


@pytest.mark.parametrize("text", [None, "", "all", "ALL", "  "])
def test_parse_window_all_data(text: str | None) -> None:
    assert st.parse_window(text) is None


@pytest.mark.parametrize("text", ["abc", "-5m", "0", "0s", "5y", "1h30m", "nan", 0, -1.0, True])
def test_parse_window_rejects(text: str | float) -> None:
    with pytest.raises(ValueError, match="window"):
        st.parse_window(text)


def test_parse_window_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="window"):
        st.parse_window(math.inf)


BOUND = r"window must be more than 0 s and at most 3650 days \(315360000 s\)"


@pytest.mark.parametrize(
    "text",
    [
        "99999999999999999999d",  # the case
        "3651d",
        "522w",
        "315360001",
        "9" * 400,  # overflows a float to inf
        315360000.5,
        10**400,  # an int too large for a float
        math.inf,
        -math.inf,
        math.nan,
        0,
        0.0,
        -1,
        "0",
        "0.0h",
    ],
)
def test_parse_window_bounds(text: str | float) -> None:
    with pytest.raises(ValueError, match=BOUND):
        st.parse_window(text)


def test_parse_window_keeps_the_bound_itself_and_all() -> None:
    assert st.parse_window("3650d") == 315360000.0
    assert st.parse_window(315360000) == 315360000.0
    assert st.parse_window("all") is None


def test_parse_window_does_not_echo_a_huge_value() -> None:
    with pytest.raises(ValueError, match="invalid window") as info:
        st.parse_window("x" * 100_000)
    assert len(str(info.value)) < 200


# ---- percentiles ------------------------------------------------------------------------------


def test_percentile_literal_values() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 0.5]
    assert st.percentile(values, 50) == 2.5
    assert st.percentile(values, 95) == pytest.approx(4.75)
    assert st.percentile(values, 0) == 0.5
    assert st.percentile(values, 100) == 5.0
    assert st.percentile([7.0], 95) == 7.0
    assert st.percentile([], 50) is None
    assert st.p50_p95([]) == {"p50": None, "p95": None}
    assert st.p50_p95([0.05, 0.1, 0.2, 0.3, 0.5]) == {"p50": 0.2, "p95": pytest.approx(0.46)}


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="percentile"):
        st.percentile([1.0], 101)


@given(
    hs.lists(hs.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60),
    hs.floats(0, 100),
)
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    expected = float(np.percentile(np.array(values), q))
    assert st.percentile(values, q) == pytest.approx(expected, rel=1e-9, abs=1e-9)


# ---- rates, CPS, energy -----------------------------------------------------------------------


def test_rate_and_cps() -> None:
    assert st.rate(1, 4) == 0.25
    assert st.rate(0, 0) is None
    assert st.cps(0.3, 3) == pytest.approx(0.1)
    assert st.cps(0.3, 0) is None  # nothing succeeded: unbounded, not zero
    assert st.cps(0.0, 2) == 0.0


def test_savings_only_against_a_priced_top_tier() -> None:
    assert st.savings(0.05, 0.02) == pytest.approx(0.03)
    assert st.savings(0.01, 0.02) == pytest.approx(-0.01)  # dearer than the top tier: negative
    assert st.savings(0.0, 0.02) is None  # unpriced top tier: no baseline to save against
    assert st.savings(0.0, 0.0) is None


def test_outcomes_keep_each_basis_apart() -> None:
    groups: dict[str | None, st.Group] = {
        "reported": (4, 3, 0.12),
        "inferred": (6, 2, 0.05),
        None: (5, 0, 0.5),  # unknown (free text)
    }
    assert st.outcomes(groups) == {
        "reported": {"tasks": 4, "successful_tasks": 3, "cost_usd": 0.12, "success_rate": 0.75,
                     "cps_usd": pytest.approx(0.04)},
        "inferred": {"tasks": 6, "successful_tasks": 2, "cost_usd": 0.05,
                     "success_rate": pytest.approx(1 / 3), "cps_usd": 0.025},
        "combined": {"tasks": 10, "successful_tasks": 5, "cost_usd": pytest.approx(0.17),
                     "success_rate": 0.5, "cps_usd": pytest.approx(0.034)},
        "unknown": {"tasks": 5, "cost_usd": 0.5},
    }  # fmt: skip
    assert st.cps_basis(4) == "reported"
    assert st.cps_basis(0) == "inferred"


def test_outcomes_of_nothing() -> None:
    empty = {"tasks": 0, "successful_tasks": 0, "cost_usd": 0.0, "success_rate": None,
             "cps_usd": None}  # fmt: skip
    assert st.outcomes({}) == {"reported": empty, "inferred": empty, "combined": empty,
                               "unknown": {"tasks": 0, "cost_usd": 0.0}}  # fmt: skip
    only_unknown = st.outcomes({None: (3, 0, 0.3)})
    assert only_unknown["combined"] == empty
    assert only_unknown["unknown"] == {"tasks": 3, "cost_usd": 0.3}


def test_energy_measured_label() -> None:
    assert st.energy_measured(0, 0) is None
    assert st.energy_measured(3, 3) is True
    assert st.energy_measured(0, 3) is False
    assert st.energy_measured(1, 3) is False  # mixed counts as estimated


def test_speculation_summary() -> None:
    assert st.speculation(30, 21, 9) == {
        "drafted": 30,
        "accepted": 21,
        "steps": 9,
        "acceptance_rate": pytest.approx(0.7),
        "mean_accepted_length": pytest.approx(21 / 9),
    }
    assert st.speculation(0, 0, 0)["acceptance_rate"] is None
    assert st.speculation(0, 0, 0)["mean_accepted_length"] is None


# ---- buckets and series -----------------------------------------------------------------------


def test_bucket_edges_cover_the_range() -> None:
    assert st.bucket_edges(900.0, 1000.0, 4) == [
        (900.0, 925.0),
        (925.0, 950.0),
        (950.0, 975.0),
        (975.0, 1000.0),
    ]
    edges = st.bucket_edges(0.0, 1.0, 3)
    assert edges[-1][1] == 1.0
    assert st.bucket_edges(5.0, 5.0, 2) == [(5.0, 5.0), (5.0, 5.0)]
    with pytest.raises(ValueError, match="buckets"):
        st.bucket_edges(0.0, 1.0, 0)


def test_bucket_width_and_clamp() -> None:
    assert st.bucket_width(0.0, 100.0, 4) == 25.0
    assert st.bucket_width(5.0, 5.0, 4) == 1.0  # one-instant span: everything in bucket 0
    assert st.clamp_bucket(4, 4) == 3  # the window's end belongs to the last bucket
    assert st.clamp_bucket(-1, 4) == 0
    assert st.clamp_bucket(2.0, 4) == 2
    assert st.clamp_bucket(None, 4) == 0


def test_series_rows() -> None:
    edges = st.bucket_edges(900.0, 1000.0, 4)
    rows = st.series(
        edges,
        requests=[(0, 2), (1, 2), (2, 2), (4, 1)],  # index 4 = the end instant
        tasks=[(0, 1, 0, 0.022), (2, 2, 1, 0.0168)],
    )
    assert [r["requests"] for r in rows] == [2, 2, 2, 1]
    assert [r["tasks"] for r in rows] == [1, 0, 2, 0]
    assert [r["successful_tasks"] for r in rows] == [0, 0, 1, 0]
    assert [r["cps_usd"] for r in rows] == [None, None, pytest.approx(0.0168), None]
    assert [r["success_rate"] for r in rows] == [0.0, None, 0.5, None]
    assert rows[0]["start"] == 900.0
    assert rows[3]["end"] == 1000.0
    assert rows[1]["cost_usd"] == 0.0
