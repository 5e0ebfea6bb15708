"""Parts (1) and (3) of ``slmgate bench grammar``, per grammar engine: decode time with each
engine against unconstrained decoding, the time to compute one token mask, and the validity of
generated instances — raw per engine, and through the router under ``strict: true`` (resample,
then refuse: what a strict request actually receives).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from benchmarks.grammar_data import Named, Schema, format_table, prompt_for

if TYPE_CHECKING:
    from decoding.constraint import GrammarEngine
    from decoding.engine import EmbeddedEngine
    from decoding.types import GenerationRequest

# ---- (1) decode -------------------------------------------------------------------------------


def _timed_generate(engine: EmbeddedEngine, request: GenerationRequest) -> dict[str, Any]:
    """Decode time per token after the first one (prefill, prompt rendering and grammar
    compilation excluded): wall time from the first token event to the finish event divided by
    the tokens emitted after the first. Also the token ids, for the mask replay."""
    from decoding.backend import FinishEvent

    first = end = None
    ids: list[int] = []
    forced = 0
    finish = "stop"
    for event in engine.generate_sync(request):
        now = time.perf_counter()
        if isinstance(event, FinishEvent):
            end, finish = now, event.reason
            continue
        ids.append(event.token_id)
        forced += int(event.forced)
        if first is None:
            first = now
    ms = None
    if first is not None and end is not None and len(ids) > 1:
        ms = (end - first) * 1e3 / (len(ids) - 1)
    return {"tokens": len(ids), "forced": forced, "ms_per_token": ms, "finish": finish,
            "token_ids": ids}  # fmt: skip


def mask_replay_us(engine: EmbeddedEngine, schema: Schema, grammar_engine: GrammarEngine,
                   token_ids: list[int]) -> list[float]:  # fmt: skip
    """Microseconds to fill the token mask at each position of ``token_ids`` (an output this
    engine's grammar produced), replayed through a fresh matcher: the mask cost alone, without
    the model."""
    from decoding.constraint import JsonSchema

    compiled = engine.grammars.compile(JsonSchema(schema), engine=grammar_engine)
    assert compiled is not None
    state = engine.grammars.new_state(compiled)
    times = []
    for token in token_ids:
        if token in engine.stop_ids:
            break
        started = time.perf_counter()
        state.fill_bitmask()
        times.append((time.perf_counter() - started) * 1e6)
        if not state.accept(token):
            break
    return times


def pick_compilable(engine: EmbeddedEngine, candidates: list[Named], n: int,
                    grammar_engines: tuple[GrammarEngine, ...]) -> list[Named]:  # fmt: skip
    """The first ``n`` candidates every engine compiles (compiled into the engine's cache, so
    the timed runs do not include compilation)."""
    from decoding.constraint import JsonSchema
    from schemas.errors import InvalidRequestError

    chosen: list[Named] = []
    for name, schema in candidates:
        if len(chosen) >= n:
            break
        try:
            for grammar_engine in grammar_engines:
                engine.grammars.compile(JsonSchema(schema), engine=grammar_engine)
        except InvalidRequestError:
            continue
        chosen.append((name, schema))
    return chosen


def bench_decode(
    engine: EmbeddedEngine, schemas: list[Named], max_tokens: int,
    grammar_engines: tuple[GrammarEngine, ...] = ("auto",),
) -> dict[str, Any]:  # fmt: skip
    """Per prompt, unconstrained and one constrained arm per engine, interleaved (the order
    rotates per prompt so no arm always runs first); medians and ratios over prompts."""
    from decoding.constraint import Constraint, JsonSchema, NoConstraint
    from decoding.types import GenerationRequest, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    arms: list[tuple[str, GrammarEngine | None]] = [
        ("unconstrained", None), *((e, e) for e in grammar_engines)
    ]
    per_prompt: list[dict[str, Any]] = []
    masks: dict[str, list[float]] = {e: [] for e in grammar_engines}
    for i, (name, schema) in enumerate(schemas):
        row: dict[str, Any] = {"schema": name}
        order = arms[i % len(arms):] + arms[: i % len(arms)]
        for arm, grammar_engine in order:
            constraint: Constraint = NoConstraint() if grammar_engine is None else JsonSchema(
                schema)  # fmt: skip
            request = GenerationRequest(prompt_for(schema), params, constraint,
                                        grammar_engine=grammar_engine)  # fmt: skip
            row[arm] = _timed_generate(engine, request)
        for grammar_engine in grammar_engines:
            masks[grammar_engine] += mask_replay_us(
                engine, schema, grammar_engine, row[grammar_engine]["token_ids"]
            )
        for arm, _ in arms:
            del row[arm]["token_ids"]
        per_prompt.append(row)

    def median_of(arm: str) -> float | None:
        values = [r[arm]["ms_per_token"] for r in per_prompt if r[arm]["ms_per_token"] is not None]
        return statistics.median(values) if values else None

    plain = median_of("unconstrained")
    out: dict[str, Any] = {"prompts": len(per_prompt), "max_tokens": max_tokens, "arms": {}}
    for arm, grammar_engine in arms:
        tokens = sum(r[arm]["tokens"] for r in per_prompt)
        forced = sum(r[arm]["forced"] for r in per_prompt)
        ms = median_of(arm)
        mask = masks.get(arm, []) if grammar_engine else []
        out["arms"][arm] = {
            "tokens": tokens,
            "ms_per_token": ms,
            "ratio_to_unconstrained": ms / plain if ms and plain else None,
            "forced_token_share": forced / tokens if grammar_engine and tokens else None,
            "mask_us_median": statistics.median(mask) if mask else None,
            "mask_us_mean": statistics.fmean(mask) if mask else None,
            "mask_us_p95": sorted(mask)[int(0.95 * (len(mask) - 1))] if mask else None,
        }
    out["per_prompt"] = per_prompt
    return out


def decode_table(d: dict[str, Any]) -> str:
    headers = ["arm", "tokens", "median ms/token", "vs unconstrained", "forced share",
               "mask us p50", "mask us mean", "mask us p95"]  # fmt: skip
    rows = [
        [arm, a["tokens"], a["ms_per_token"], a["ratio_to_unconstrained"], a["forced_token_share"],
         a["mask_us_median"], a["mask_us_mean"], a["mask_us_p95"]]
        for arm, a in d["arms"].items()
    ]  # fmt: skip
    return format_table(headers, rows)


# ---- (3) validity -----------------------------------------------------------------------------

VALIDITY_OUTCOMES = ("valid", "invalid", "truncated", "refused", "skipped", "error")
STRICT_OUTCOMES = ("valid", "invalid_200", "invalid_output_502", "truncated", "refused",
                   "skipped", "error")  # fmt: skip


def judge(text: str, finish: str, schema: Schema, max_tokens: int) -> dict[str, Any]:
    """valid / invalid / truncated for one finished output, checked by ``jsonschema``."""
    from schemas.jsonschema_utils import validation_errors

    if finish == "length":
        return {"outcome": "truncated", "detail": f"hit max_tokens={max_tokens}"}
    try:
        instance = json.loads(text)
    except json.JSONDecodeError as exc:
        return {"outcome": "invalid", "detail": f"not JSON: {exc.msg}"}
    errors = validation_errors(instance, schema)
    if errors:
        return {"outcome": "invalid", "detail": errors[0][:160]}
    return {"outcome": "valid", "detail": ""}


def validity_one(engine: EmbeddedEngine, schema: Schema, max_tokens: int,
                 grammar_engine: GrammarEngine = "auto") -> dict[str, Any]:  # fmt: skip
    """One greedy generation straight from the engine, no retry."""
    from decoding.constraint import JsonSchema
    from decoding.types import GenerationRequest, SamplingParams
    from schemas.errors import ContextLengthError, InvalidRequestError

    request = GenerationRequest(
        prompt_for(schema), SamplingParams(temperature=0, max_tokens=max_tokens),
        JsonSchema(schema), grammar_engine=grammar_engine,
    )  # fmt: skip
    try:
        prepared = engine.prepare(request)
        result = engine.complete_sync(request)
    except ContextLengthError:
        return {"outcome": "skipped", "detail": "prompt too long for the context"}
    except InvalidRequestError as exc:
        return {"outcome": "refused", "detail": f"{exc.code}: {exc.message[:120]}"}
    except Exception as exc:
        return {"outcome": "error", "detail": f"{type(exc).__name__}: {str(exc)[:120]}"}
    choice = result.choices[0]
    base = {"tokens": len(choice.token_ids), "text": choice.text[:300],
            "engine": prepared.grammar.engine if prepared.grammar else None}  # fmt: skip
    return {**judge(choice.text, choice.finish_reason, schema, max_tokens), **base}


def strict_one(engine: EmbeddedEngine, schema: Schema, max_tokens: int) -> dict[str, Any]:
    """The same request with ``strict: true`` through the router (``auto`` engine, resamples,
    ``on_invalid`` at its strict default): what the caller receives, judged independently."""
    from decoding.constraint import JsonSchema
    from decoding.types import GenerationRequest, SamplingParams
    from router.router import Route, Router, Trace
    from schemas.errors import ContextLengthError, InvalidOutputError, InvalidRequestError

    route = Route("bench", (engine.config.name,))
    router = Router({engine.config.name: engine}, {"bench": route})
    request = GenerationRequest(
        prompt_for(schema), SamplingParams(temperature=0, max_tokens=max_tokens),
        JsonSchema(schema, strict=True), request_id="bench-strict",
    )  # fmt: skip
    trace = Trace(request.request_id, route.name, None)

    async def ask() -> Any:
        plan = await router.plan_async(route, request, trace)
        return await router.complete(plan, request, trace)

    try:
        answer = asyncio.run(ask())
    except ContextLengthError:
        return {"outcome": "skipped", "detail": "prompt too long for the context"}
    except InvalidOutputError as exc:
        return {"outcome": "invalid_output_502", "detail": exc.message[:160],
                "samples": len(trace.attempts)}  # fmt: skip
    except InvalidRequestError as exc:
        return {"outcome": "refused", "detail": f"{exc.code}: {exc.message[:120]}"}
    except Exception as exc:
        return {"outcome": "error", "detail": f"{type(exc).__name__}: {str(exc)[:120]}"}
    choice = answer.result.choices[0]
    verdict = judge(choice.text, choice.finish_reason, schema, max_tokens)
    if verdict["outcome"] == "invalid":
        verdict["outcome"] = "invalid_200"  # returned to the caller: must never happen
    return {**verdict, "samples": len(trace.attempts), "text": choice.text[:300]}


def bench_validity(engine: EmbeddedEngine, schemas: list[Named], max_tokens: int,
                   grammar_engines: tuple[GrammarEngine, ...] = ("auto",),
                   strict: bool = True) -> dict[str, Any]:  # fmt: skip
    """Per engine: one greedy output per schema, judged; then the strict arm."""
    out: dict[str, Any] = {"sampled": len(schemas), "max_tokens": max_tokens, "arms": {}}
    for grammar_engine in grammar_engines:
        samples = [{"schema": name, **validity_one(engine, schema, max_tokens, grammar_engine)}
                   for name, schema in schemas]  # fmt: skip
        out["arms"][grammar_engine] = summarize(samples, VALIDITY_OUTCOMES)
    if strict:
        samples = [{"schema": name, **strict_one(engine, schema, max_tokens)}
                   for name, schema in schemas]  # fmt: skip
        out["arms"]["strict (auto, router)"] = summarize(samples, STRICT_OUTCOMES)
    return out


def summarize(samples: list[dict[str, Any]], outcomes: tuple[str, ...]) -> dict[str, Any]:
    counts = Counter(s["outcome"] for s in samples)
    finished = counts["valid"] + counts["invalid"] + counts["invalid_200"]
    return {
        "outcomes": {k: counts[k] for k in outcomes},
        "valid_rate": counts["valid"] / len(samples) if samples else None,
        "valid_rate_of_finished": counts["valid"] / finished if finished else None,
        "resamples": sum(max(s.get("samples", 1) - 1, 0) for s in samples),
        "samples": samples,
    }


def validity_table(v: dict[str, Any]) -> str:
    outcomes = sorted({k for a in v["arms"].values() for k in a["outcomes"]},
                      key=lambda k: (STRICT_OUTCOMES + VALIDITY_OUTCOMES).index(k))  # fmt: skip
    headers = ["arm", *outcomes, "valid% (all)", "valid% (finished)", "resamples"]
    rows = [
        [arm, *(a["outcomes"].get(k, 0) for k in outcomes),
         None if a["valid_rate"] is None else 100 * a["valid_rate"],
         None if a["valid_rate_of_finished"] is None else 100 * a["valid_rate_of_finished"],
         a["resamples"]]
        for arm, a in v["arms"].items()
    ]  # fmt: skip
    lines = [format_table(headers, rows)]
    for arm, a in v["arms"].items():
        for s in a["samples"]:
            if s["outcome"] != "valid":
                lines.append(f"  [{arm}] {s['outcome']:9s} {s['schema']}: {s['detail']}")
    return "\n".join(lines)
