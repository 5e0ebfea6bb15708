"""Part (2) of ``slmgate bench grammar``: compile every JSONSchemaBench schema with each grammar
engine setting (``xgrammar``, ``llguidance``, ``auto``), from scratch, under the request
deadline.

Each compile runs on a worker thread and the bench waits at most ``deadline_s`` for it, as a
request does; a compile past it counts as ``timeout`` (the 400 a request would get) and is left
to finish, as the server leaves it to finish into its cache. Each engine's arm waits for its
stragglers before the next arm starts, so no arm's timings include another arm's work.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.grammar_data import Named, Schema, format_table, keyword_of
from router.stats import percentile

if TYPE_CHECKING:
    from decoding.constraint import GrammarEngine
    from decoding.grammar import GrammarCompiler

OUTCOMES = ("compiled", "timeout", "unsupported", "unsatisfiable", "invalid", "other")


@dataclass
class CompileStats:
    counts: Counter[str] = field(default_factory=Counter)
    times_ms: list[float] = field(default_factory=list)  # successful compiles only
    engines: Counter[str] = field(default_factory=Counter)  # xgrammar / llguidance / outlines
    incomplete: int = 0  # compiled, but some keywords are checked only after generation
    unsupported_keywords: Counter[str] = field(default_factory=Counter)
    other_errors: Counter[str] = field(default_factory=Counter)
    slowest: tuple[str, float] | None = None  # (schema name, ms) of the slowest compile
    compiled_names: set[str] = field(default_factory=set)

    def merge(self, other: CompileStats) -> None:
        for attr in ("counts", "engines", "unsupported_keywords", "other_errors"):
            getattr(self, attr).update(getattr(other, attr))
        self.times_ms.extend(other.times_ms)
        self.incomplete += other.incomplete
        self.compiled_names |= other.compiled_names
        if other.slowest and (not self.slowest or other.slowest[1] > self.slowest[1]):
            self.slowest = other.slowest

    def summary(self) -> dict[str, Any]:
        total = sum(self.counts.values())
        return {
            "total": total,
            **{k: self.counts[k] for k in OUTCOMES},
            "success_rate": self.counts["compiled"] / total if total else None,
            "compile_ms_p50": percentile(self.times_ms, 50),
            "compile_ms_p95": percentile(self.times_ms, 95),
            "compile_ms_max": max(self.times_ms, default=None),
            "slowest": None if self.slowest is None else list(self.slowest),
            "engines": dict(self.engines),
            "incomplete": self.incomplete,
            "unsupported_keywords": dict(self.unsupported_keywords.most_common()),
            "other_errors": dict(self.other_errors.most_common(5)),
        }


def compile_one(compiler: GrammarCompiler, schema: Schema, stats: CompileStats, name: str = "",
                engine: GrammarEngine = "auto", deadline_s: float | None = None,
                pool: ThreadPoolExecutor | None = None) -> None:  # fmt: skip
    """Compile ``schema`` bypassing the cache and record the outcome; with ``pool`` and
    ``deadline_s`` the wait is bounded like a request's."""
    from decoding.constraint import JsonSchema
    from schemas.errors import (
        InvalidRequestError,
        UnsatisfiableSchemaError,
        UnsupportedSchemaError,
    )

    started = time.perf_counter()
    try:
        constraint = JsonSchema(schema)
        if pool is None:
            compiled = compiler._compile_uncached(constraint, "response_format", engine)
        else:
            future = pool.submit(compiler._compile_uncached, constraint, "response_format", engine)
            compiled = future.result(timeout=deadline_s)
    except FutureTimeout:
        stats.counts["timeout"] += 1
    except UnsupportedSchemaError as exc:
        stats.counts["unsupported"] += 1
        stats.unsupported_keywords[keyword_of(exc.message)] += 1
    except UnsatisfiableSchemaError:
        stats.counts["unsatisfiable"] += 1
    except InvalidRequestError:
        stats.counts["invalid"] += 1
    except Exception as exc:
        stats.counts["other"] += 1
        stats.other_errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
    else:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        stats.times_ms.append(elapsed_ms)
        if stats.slowest is None or elapsed_ms > stats.slowest[1]:
            stats.slowest = (name, elapsed_ms)
        stats.counts["compiled"] += 1
        stats.compiled_names.add(name)
        stats.engines[compiled.engine] += 1
        stats.incomplete += int(not compiled.complete)


def bench_compile(compiler: GrammarCompiler, subsets: dict[str, list[Named]], limit: int | None,
                  progress: bool = False, engine: GrammarEngine = "auto",
                  deadline_s: float | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One engine setting: per subset, outcome counts and compile-time percentiles, plus an
    ``ALL`` row (its ``compiled_names`` list says which schemas compiled)."""
    everything = CompileStats()
    rows: dict[str, dict[str, Any]] = {}
    pool = ThreadPoolExecutor(4, thread_name_prefix="bench-compile") if deadline_s else None
    try:
        for name, items in subsets.items():
            stats = CompileStats()
            started = time.perf_counter()
            for schema_name, schema in items[:limit]:
                compile_one(compiler, schema, stats, schema_name, engine, deadline_s, pool)
            everything.merge(stats)
            rows[name] = stats.summary()
            if progress:
                print(f"  {engine}: compiled {name}: {len(items[:limit])} schemas in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # stragglers finish before the next arm is timed
    rows["ALL"] = {**everything.summary(), "compiled_names": sorted(everything.compiled_names)}
    return rows


def union_row(arms: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """What the named engines compile together vs what ``auto`` compiles alone."""
    named = [a for a in arms if a != "auto"]
    sets = {a: set(arms[a]["ALL"]["compiled_names"]) for a in arms}
    union = set().union(*(sets[a] for a in named)) if named else set()
    out: dict[str, Any] = {"union_of": named, "union": len(union)}
    if "auto" in sets:
        out["auto"] = len(sets["auto"])
        out["union_not_auto"] = sorted(union - sets["auto"])[:20]
        out["auto_not_union"] = sorted(sets["auto"] - union)[:20]
    return out


def compile_table(rows: dict[str, dict[str, Any]]) -> str:
    headers = ["subset", "schemas", "compiled", "timeout", "unsupp", "unsat", "invalid", "other",
               "success%", "p50 ms", "p95 ms", "max ms", "incomplete"]  # fmt: skip
    body = [
        [
            name, r["total"], r["compiled"], r["timeout"], r["unsupported"], r["unsatisfiable"],
            r["invalid"], r["other"],
            None if r["success_rate"] is None else 100 * r["success_rate"],
            r["compile_ms_p50"], r["compile_ms_p95"], r["compile_ms_max"], r["incomplete"],
        ]
        for name, r in rows.items()
    ]  # fmt: skip
    return format_table(headers, body)


def compile_report(arms: dict[str, dict[str, dict[str, Any]]], deadline_s: float | None) -> (
    list[str]
):
    """Report lines for part (2): one table per engine setting, then the union check."""
    deadline = "none" if not deadline_s else f"{deadline_s:g} s"
    lines = ["", f"(2) compile: fresh per schema, request deadline {deadline}; "
             "p50/p95/max over compiled schemas"]  # fmt: skip
    for engine, rows in arms.items():
        all_row = rows["ALL"]
        lines += ["", f"[{engine}] engines used: {all_row['engines']}", compile_table(rows)]
        if all_row["unsupported_keywords"]:
            lines.append("unsupported keywords: " + ", ".join(
                f"{k} {n}" for k, n in all_row["unsupported_keywords"].items()))  # fmt: skip
        if all_row["slowest"]:
            name, ms = all_row["slowest"]
            lines.append(f"slowest compile: {name} ({ms / 1e3:.2f} s)")
        lines += [f"other error: {e} (x{n})" for e, n in all_row["other_errors"].items()]
    if len(arms) > 1:
        u = union_row(arms)
        lines.append(f"\nunion of {' + '.join(u['union_of'])}: {u['union']} compiled; "
                     f"auto: {u.get('auto', '-')}")  # fmt: skip
        if u.get("union_not_auto"):
            lines.append(f"compiled by an engine but not by auto: {u['union_not_auto']}")
    return lines
