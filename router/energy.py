"""Energy per request: measured from hardware counters where the machine exposes them.

Sources, in order of preference:

- ``nvml``: NVIDIA GPUs' total-energy counter (millijoules since the driver loaded), summed over
  the visible GPUs. Used only if ``pynvml`` imports, a GPU exists and the counter is supported.
- ``rapl``: Intel/AMD RAPL package counters under ``/sys/class/powercap/intel-rapl:N/energy_uj``
  (microjoules), summed over packages, wraparound handled with ``max_energy_range_uj``. Used only
  if the files are readable (recent kernels restrict them to root).
- ``estimate``: no counter, so energy = watts × busy seconds. By default busy seconds are the
  process's CPU seconds (all threads) and watts are :data:`DEFAULT_WATTS_PER_CORE`, a per-core
  share of a server CPU's TDP; configure both for other hardware.

Counters are machine-wide: a reading covers everything the device did in the interval, and two
overlapping requests each see the other's energy. The measured/estimated flag travels with every
figure so nothing estimated is shown as measured. Only in-process tiers are metered: a remote
tier (vLLM, a hosted API) spends its energy on its own server, which no counter or CPU clock
here sees, so its attempts carry no energy figure. The arithmetic is in pure functions so it is
tested on literal counter readings.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

EnergySource = Literal["nvml", "rapl", "estimate"]

#: Watts per fully busy CPU core for the estimate: a 200 W TDP server CPU with 20 cores ≈ 10 W.
DEFAULT_WATTS_PER_CORE = 10.0
RAPL_ROOT = Path("/sys/class/powercap")
_PACKAGE = re.compile(r"^intel-rapl:\d+$")  # packages only; subzones (core, dram) nest inside


# ---- pure arithmetic -------------------------------------------------------------------------


def counter_delta(before: int, after: int, max_range: int) -> int:
    """Increase of a counter that wraps to 0 after ``max_range`` (RAPL's max_energy_range_uj).

    A reading lower than the previous one means the counter wrapped once (an interval spanning
    two wraps is indistinguishable and would take minutes of full load at RAPL's ranges).
    """
    if after >= before:
        return after - before
    if max_range <= 0:
        raise ValueError(f"counter went backwards ({before} -> {after}) with no range to wrap")
    return max_range - before + after


def rapl_joules(
    before: Mapping[str, int], after: Mapping[str, int], ranges: Mapping[str, int]
) -> float:
    """Joules over all packages from two sets of ``energy_uj`` readings keyed by zone name."""
    missing = set(before) ^ set(after)
    if missing:
        raise ValueError(f"readings cover different zones: {sorted(missing)}")
    micro = sum(counter_delta(before[z], after[z], ranges.get(z, 0)) for z in before)
    return micro / 1e6


def nvml_joules(before: Sequence[int], after: Sequence[int]) -> float:
    """Joules over all GPUs from two sets of NVML total-energy readings (millijoules)."""
    if len(before) != len(after):
        raise ValueError("readings cover different numbers of GPUs")
    return sum(a - b for b, a in zip(before, after, strict=True)) / 1e3


def estimate_joules(busy_s: float, watts: float) -> float:
    """Estimated energy: power while busy × busy time (negative clock steps count as zero)."""
    return max(busy_s, 0.0) * watts


# ---- counter readers -------------------------------------------------------------------------


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def rapl_zones(root: Path = RAPL_ROOT) -> dict[str, Path]:
    """Readable top-level RAPL package zones under ``root``, by name; empty if none."""
    zones: dict[str, Path] = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return zones
    for entry in entries:
        if not _PACKAGE.match(entry.name):
            continue
        try:
            _read_int(entry / "energy_uj")
        except (OSError, ValueError):
            continue  # permission denied (non-root on kernels ≥ 5.10) or not a counter
        zones[entry.name] = entry
    return zones


def read_rapl(zones: Mapping[str, Path]) -> dict[str, int]:
    """Current ``energy_uj`` of each zone."""
    return {name: _read_int(path / "energy_uj") for name, path in zones.items()}


def rapl_ranges(zones: Mapping[str, Path]) -> dict[str, int]:
    """``max_energy_range_uj`` of each zone (0 if absent: a wrap then raises)."""
    ranges = {}
    for name, path in zones.items():
        try:
            ranges[name] = _read_int(path / "max_energy_range_uj")
        except (OSError, ValueError):
            ranges[name] = 0
    return ranges


def nvml_handles() -> list[Any]:
    """NVML handles of GPUs whose total-energy counter works; empty without pynvml or a GPU."""
    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                   for i in range(pynvml.nvmlDeviceGetCount())]  # fmt: skip
        for handle in handles:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises if unsupported
    except Exception as exc:  # NVMLError and friends: no driver, no GPU, old GPU
        log.debug("NVML energy unavailable: %s", exc)
        return []
    return handles


def read_nvml(handles: Sequence[Any]) -> list[int]:
    import pynvml

    return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in handles]


# ---- the meter -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnergyToken:
    """Readings taken by :meth:`EnergyMeter.start`, handed back to :meth:`EnergyMeter.stop`."""

    source: EnergySource
    reading: Any  # dict[str, int] (rapl), list[int] (nvml), None (estimate)
    busy_s: float  # busy clock at start: the estimate if a counter fails to read at stop


class EnergyMeter:
    """Measures the energy of an interval: ``token = meter.start(); ...; meter.stop(token)``."""

    def __init__(
        self,
        *,
        prefer: EnergySource | None = None,
        watts: float = DEFAULT_WATTS_PER_CORE,
        busy_clock: Callable[[], float] = time.process_time,
        rapl_root: Path = RAPL_ROOT,
    ):
        """``prefer`` forces a source (``estimate`` always works; a missing counter falls back to
        the estimate). ``watts`` × ``busy_clock`` seconds is the estimate: the default clock is
        this process's CPU time, so ``watts`` is per busy core; pass ``time.monotonic`` and the
        device's power to estimate an accelerator by wall time instead."""
        if watts < 0:
            raise ValueError(f"watts must be >= 0, got {watts}")
        self.watts = watts
        self.busy_clock = busy_clock
        self._nvml: list[Any] = []
        self._rapl: dict[str, Path] = {}
        self._ranges: dict[str, int] = {}
        self.source: EnergySource = "estimate"
        if prefer in (None, "nvml"):
            self._nvml = nvml_handles()
            if self._nvml:
                self.source = "nvml"
                return
        if prefer in (None, "rapl"):
            self._rapl = rapl_zones(rapl_root)
            if self._rapl:
                self._ranges = rapl_ranges(self._rapl)
                self.source = "rapl"

    @property
    def measured(self) -> bool:
        return self.source != "estimate"

    def start(self) -> EnergyToken:
        busy = self.busy_clock()
        try:
            if self.source == "nvml":
                return EnergyToken("nvml", read_nvml(self._nvml), busy)
            if self.source == "rapl":
                return EnergyToken("rapl", read_rapl(self._rapl), busy)
        except Exception as exc:  # a counter that stops answering: estimate this interval
            log.warning("energy counter %s failed: %s; estimating", self.source, exc)
        return EnergyToken("estimate", None, busy)

    def stop(self, token: EnergyToken) -> tuple[float, bool]:
        """Joules since ``start`` and whether they were measured (False: estimated)."""
        try:
            if token.source == "nvml":
                return nvml_joules(token.reading, read_nvml(self._nvml)), True
            if token.source == "rapl":
                return rapl_joules(token.reading, read_rapl(self._rapl), self._ranges), True
        except Exception as exc:
            log.warning("energy counter %s failed: %s; estimating", token.source, exc)
        return estimate_joules(self.busy_clock() - token.busy_s, self.watts), False
