"""Per-key budgets and rate limits, counted in ``SharedState`` (Redis across replicas, else this
process), checked before a request runs and settled with its cost and tokens after it.

Windows are fixed and in UTC: a minute for requests and tokens per minute, a calendar day and
month for budgets. A key over a limit gets an OpenAI-style 429 saying which limit and when it
resets (``Retry-After``). Spend counters start, for a window this process has not seen yet,
from what the ledger already holds for the key, so a restart does not reset a budget.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.shared_state import SharedState
from router.ledger.key_store import ApiKey
from schemas.errors import InsufficientQuotaError, PermissionDeniedError, RateLimitError

log = logging.getLogger(__name__)

SpendSince = Callable[[str, float], float]  # (key_id, unix start) -> USD the ledger holds


@dataclass(frozen=True, slots=True)
class Window:
    """One fixed window: its id (part of the counter's name), start and end (unix seconds)."""

    name: str
    start: float
    end: float

    @property
    def ttl_s(self) -> int:
        """How long its counter lives: the window, plus a minute for clocks that disagree."""
        return int(self.end - self.start) + 60


def minute_window(now: float) -> Window:
    start = now - now % 60
    return Window(f"m{int(start)}", start, start + 60)


def day_window(now: float) -> Window:
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = day.timestamp()
    return Window(f"d{day:%Y%m%d}", start, start + 86400)


def month_window(now: float) -> Window:
    first = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0,
                                                     microsecond=0)  # fmt: skip
    days = calendar.monthrange(first.year, first.month)[1]
    start = first.timestamp()
    return Window(f"mo{first:%Y%m}", start, start + days * 86400)


class QuotaGate:
    """``admit`` before a request, ``settle`` after it; only the limits a key has cost a round
    trip (a key without limits costs none)."""

    def __init__(
        self,
        state: SharedState,
        spend_since: SpendSince | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.state = state
        self.spend_since = spend_since
        self.clock = clock
        self._seeded: set[str] = set()  # spend counters this process has started

    def _spend_key(self, key_id: str, window: Window) -> str:
        return self.state.key("spend", key_id, window.name)

    async def _seed(self, key: ApiKey, windows: list[Window]) -> None:
        for window in windows:
            name = self._spend_key(key.key_id, window)
            if name in self._seeded or self.spend_since is None:
                continue
            try:
                spent = await asyncio.to_thread(self.spend_since, key.key_id, window.start)
            except Exception:  # ledger down: count from zero here, try again next request
                log.warning("budget of key %s: the ledger's spend is unavailable", key.key_id)
                continue
            await self.state.seed(name, spent, window.ttl_s)
            self._seeded.add(name)

    def _budget_windows(self, key: ApiKey, now: float) -> list[tuple[str, float, Window]]:
        limits = key.limits
        out = []
        if limits.budget_daily_usd is not None:
            out.append(("daily", limits.budget_daily_usd, day_window(now)))
        if limits.budget_monthly_usd is not None:
            out.append(("monthly", limits.budget_monthly_usd, month_window(now)))
        return out

    async def admit(self, key: ApiKey, model: str) -> None:
        """Raise the 403/429 this request gets, or count it (requests per minute) and return."""
        if not key.allows(model):
            raise PermissionDeniedError(
                f"API key {key.name!r} may not use model {model!r} "
                f"(allowed: {', '.join(key.limits.models)})",
                param="model",
            )
        limits, now = key.limits, self.clock()
        budgets = self._budget_windows(key, now)
        if not budgets and limits.tpm is None and limits.rpm is None:
            return
        await self._seed(key, [w for _, _, w in budgets])
        minute = minute_window(now)
        reads = [self._spend_key(key.key_id, w) for _, _, w in budgets]
        if limits.tpm is not None:
            reads.append(self.state.key("tpm", key.key_id, minute.name))
        add = None if limits.rpm is None else (self.state.key("rpm", key.key_id, minute.name), 1.0)
        values, requests = await self.state.read_and_add(reads, add, minute.ttl_s)
        for (period, budget, window), spent in zip(budgets, values, strict=False):
            if spent >= budget:
                raise InsufficientQuotaError(
                    f"API key {key.name!r} has spent ${spent:.4f} of its {period} budget of "
                    f"${budget:.4f}; it resets at {_utc(window.end)}",
                    retry_after=window.end - now,
                )
        if limits.tpm is not None and values[len(budgets)] >= limits.tpm:
            raise RateLimitError(
                f"API key {key.name!r} used {int(values[len(budgets)])} of its {limits.tpm} "
                "tokens per minute; retry in the next minute",
                code="tokens_per_minute_exceeded",
                retry_after=minute.end - now,
            )
        if limits.rpm is not None and requests is not None and requests > limits.rpm:
            raise RateLimitError(
                f"API key {key.name!r} is limited to {limits.rpm} requests per minute; retry "
                "in the next minute",
                code="requests_per_minute_exceeded",
                retry_after=minute.end - now,
            )

    async def settle(self, key: ApiKey, tokens: int, cost_usd: float) -> None:
        """Count a finished request's tokens and cost against the key's limits."""
        now = self.clock()
        adds: list[tuple[str, float, int]] = []
        budgets = self._budget_windows(key, now)
        if cost_usd > 0:
            await self._seed(key, [w for _, _, w in budgets])
            adds += [(self._spend_key(key.key_id, w), cost_usd, w.ttl_s) for _, _, w in budgets]
        if key.limits.tpm is not None and tokens > 0:
            minute = minute_window(now)
            adds.append((self.state.key("tpm", key.key_id, minute.name), tokens, minute.ttl_s))
        await self.state.add_many(adds)


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")
