"""Energy arithmetic on literal counter readings, and the meter over a fake powercap tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.energy import (
    DEFAULT_WATTS_PER_CORE,
    EnergyMeter,
    counter_delta,
    estimate_joules,
    nvml_joules,
    rapl_joules,
    rapl_ranges,
    rapl_zones,
)

RANGE = 262_143_328_850  # a real package's max_energy_range_uj


def test_counter_delta_without_wrap() -> None:
    assert counter_delta(1_000, 4_500, RANGE) == 3_500
    assert counter_delta(7, 7, RANGE) == 0


def test_counter_delta_wraps_once() -> None:
    # 100 µJ before the top of the range, then 250 µJ past zero: 350 µJ in all.
    assert counter_delta(RANGE - 100, 250, RANGE) == 350


def test_counter_delta_backwards_without_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="backwards"):
        counter_delta(500, 100, 0)


def test_rapl_joules_sums_packages_one_of_them_wrapped() -> None:
    before = {"intel-rapl:0": 10_000_000, "intel-rapl:1": RANGE - 2_000_000}
    after = {"intel-rapl:0": 13_500_000, "intel-rapl:1": 1_000_000}
    ranges = {"intel-rapl:0": RANGE, "intel-rapl:1": RANGE}
    assert rapl_joules(before, after, ranges) == 6.5  # 3.5 J + (2 J + 1 J)


def test_rapl_joules_needs_the_same_zones() -> None:
    with pytest.raises(ValueError, match="different zones"):
        rapl_joules({"intel-rapl:0": 1}, {"intel-rapl:1": 2}, {})


def test_nvml_joules_sums_gpus_in_millijoules() -> None:
    assert nvml_joules([1_000, 50_000], [3_500, 51_000]) == 3.5
    with pytest.raises(ValueError, match="numbers of GPUs"):
        nvml_joules([1], [1, 2])


def test_estimate_is_watts_times_busy_seconds() -> None:
    assert estimate_joules(2.5, 10.0) == 25.0
    assert estimate_joules(-1.0, 10.0) == 0.0


def _zone(root: Path, name: str, energy: int | None, max_range: int | None = RANGE) -> Path:
    zone = root / name
    zone.mkdir()
    if energy is not None:
        (zone / "energy_uj").write_text(f"{energy}\n")
    if max_range is not None:
        (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def test_rapl_zones_takes_readable_packages_only(tmp_path: Path) -> None:
    _zone(tmp_path, "intel-rapl:0", 5)
    _zone(tmp_path, "intel-rapl:0:0", 3)  # core subzone: inside package 0, not counted twice
    _zone(tmp_path, "intel-rapl:1", None)  # no readable counter
    (tmp_path / "intel-rapl:1" / "energy_uj").mkdir()  # reading it fails with an OSError
    _zone(tmp_path, "intel-rapl:2", 9, max_range=None)
    zones = rapl_zones(tmp_path)
    assert sorted(zones) == ["intel-rapl:0", "intel-rapl:2"]
    assert rapl_ranges(zones) == {"intel-rapl:0": RANGE, "intel-rapl:2": 0}
    assert rapl_zones(tmp_path / "missing") == {}


def test_meter_reads_rapl_across_a_wrap(tmp_path: Path) -> None:
    p0 = _zone(tmp_path, "intel-rapl:0", RANGE - 1_000_000)
    p1 = _zone(tmp_path, "intel-rapl:1", 20_000_000)
    meter = EnergyMeter(prefer="rapl", rapl_root=tmp_path)
    assert meter.source == "rapl"
    assert meter.measured
    token = meter.start()
    (p0 / "energy_uj").write_text("4000000\n")  # wrapped: 1 J + 4 J
    (p1 / "energy_uj").write_text("22500000\n")  # 2.5 J
    assert meter.stop(token) == (7.5, True)


def test_meter_estimates_when_a_counter_disappears(tmp_path: Path) -> None:
    zone = _zone(tmp_path, "intel-rapl:0", 100)
    ticks = iter([10.0, 12.0])
    meter = EnergyMeter(
        prefer="rapl", rapl_root=tmp_path, watts=4.0, busy_clock=lambda: next(ticks)
    )
    token = meter.start()
    (zone / "energy_uj").unlink()
    assert meter.stop(token) == (8.0, False)


def test_meter_estimates_without_counters(tmp_path: Path) -> None:
    ticks = iter([100.0, 101.5])
    meter = EnergyMeter(rapl_root=tmp_path, watts=20.0, busy_clock=lambda: next(ticks))
    assert meter.source == "estimate"
    assert not meter.measured
    token = meter.start()
    assert meter.stop(token) == (30.0, False)


def test_meter_forced_estimate_ignores_rapl(tmp_path: Path) -> None:
    _zone(tmp_path, "intel-rapl:0", 100)
    meter = EnergyMeter(prefer="estimate", rapl_root=tmp_path)
    assert meter.source == "estimate"
    assert meter.watts == DEFAULT_WATTS_PER_CORE


def test_meter_rejects_negative_watts() -> None:
    with pytest.raises(ValueError, match="watts"):
        EnergyMeter(watts=-1.0)
