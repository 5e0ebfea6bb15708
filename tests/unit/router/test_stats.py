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
