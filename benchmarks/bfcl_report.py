"""The records and report of ``slmgate eval bfcl`` (``benchmarks.bfcl_eval``): one record per
item and policy, the metrics per policy, the Markdown tables, and what the same records say
under another policy (a simulated cascade) or another price (a hosted top tier). Pure: no
requests, unit-tested on literal records."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from router.stats import percentile


@dataclass(slots=True)
class ItemRecord:
    """One BFCL item under one policy: the verdict and what the gateway said about it."""

    category: str
    id: str
    policy: str
    task_id: str
    success: bool
    error_type: str | None = None  # BFCL's, or "request:<Exception>" / "http_<status>"
    error: str | None = None
    request_error: bool = False  # the gateway gave no usable reply
    tier: str | None = None
    model: str | None = None
    route: str | None = None
    valid: bool | None = None
    executable: bool | None = None  # the gateway's own verdict
    executable_local: bool | None = None  # checked here against the offered tools
    cost_usd: float | None = None
    counterfactual_cost_usd: float | None = None
    fallback_reason: str | None = None
    confidence: float | None = None
    signals: dict[str, float] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    latency_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    calls: int = 0  # tool calls in the reply
    features: dict[str, float] = field(default_factory=dict)  # pre-router features of the request
    memory_examples: int | None = None  # demonstrations the first tier was shown (memory routes)
    output: str | None = None  # the reply's message (content and calls), to compare policies
    kind: str = "tools"  # the request's kind for deferral: "tools", or "json" (--format json)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.category, self.id, self.policy


def _rate(hits: int, total: int) -> float | None:
    return None if total == 0 else hits / total


def summarize(records: Sequence[ItemRecord], policy: str) -> dict[str, Any]:
    """The metrics of one policy's records.

    Accuracy and CPS count every item (a failed request is a failed item that cost nothing we
    know of). Rates read from the gateway's facts use only the items whose reply carried that
    fact; latency percentiles use only replies (an instant connection error is not a latency).
    """
    rows = [r for r in records if r.policy == policy]
    replies = [r for r in rows if not r.request_error]
    ok = sum(r.success for r in rows)
    cost = sum(r.cost_usd or 0.0 for r in rows)
    costed = [r for r in rows if r.cost_usd is not None]
    valid = [r.valid for r in replies if r.valid is not None]
    calling = [r.executable_local for r in replies if r.executable_local is not None]
    gw_exec = [r.executable for r in replies if r.executable is not None]
    fallback = [r.fallback_reason is not None for r in replies if r.tier is not None]
    latencies = sorted(r.latency_s for r in replies)
    categories: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = categories.setdefault(r.category, {"items": 0, "successes": 0})
        c["items"] += 1
        c["successes"] += int(r.success)
    for name, c in categories.items():
        c["accuracy"] = _rate(c["successes"], c["items"])
        c.update(_reply_rates([r for r in replies if r.category == name]))
    tiers: dict[str, int] = {}
    for r in replies:
        if r.tier is not None:
            tiers[r.tier] = tiers.get(r.tier, 0) + 1
    return {
        "policy": policy,
        "items": len(rows),
        "successes": ok,
        "accuracy": _rate(ok, len(rows)),
        "per_category": categories,
        "total_cost_usd": cost,
        "mean_cost_usd": None if not costed else cost / len(costed),
        "cps_usd": None if ok == 0 else cost / ok,
        "counterfactual_cost_usd": sum(r.counterfactual_cost_usd or 0.0 for r in rows),
        "schema_validity_rate": _rate(sum(valid), len(valid)),
        "executable_call_rate": _rate(sum(calling), len(calling)),
        "gateway_executable_rate": _rate(sum(gw_exec), len(gw_exec)),
        "fallback_rate": _rate(sum(fallback), len(fallback)),
        "p50_latency_s": percentile(latencies, 50),
        "p95_latency_s": percentile(latencies, 95),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in rows),
        "completion_tokens": sum(r.completion_tokens or 0 for r in rows),
        "tiers": tiers,
        "request_errors": len(rows) - len(replies),
        "error_types": _count(r.error_type for r in rows if not r.success),
    }


def compare_escalation(
    records: Sequence[ItemRecord], verify: str, regen: str
) -> dict[str, Any]:
    """Verified escalation (``verify``) against regenerating escalation (``regen``) on the same
    items: identical replies, accuracy, the share of the answering tier's output tokens reused
    from the earlier tier, and the latency of the items both escalated (whole request, and the
    answering attempt alone)."""
    by_key = {(r.category, r.id, r.policy): r for r in records}
    pairs = [
        (r, by_key[(r.category, r.id, regen)])
        for r in records
        if r.policy == verify and (r.category, r.id, regen) in by_key
    ]
    both = [(a, b) for a, b in pairs if not a.request_error and not b.request_error]
    escalated = [(a, b) for a, b in both if a.fallback_reason and b.fallback_reason]
    reused = out = 0
    for a, _ in escalated:
        last = _answering(a)
        if last is not None and last.get("escalation") == "verified":
            reused += int(last.get("reused_tokens") or 0)
            out += int(last.get("completion_tokens") or 0)

    def attempt_latency(r: ItemRecord) -> float:
        last = _answering(r)
        return float(last.get("latency_s") or 0.0) if last else 0.0

    return {
        "verify": verify,
        "regen": regen,
        "items": len(both),
        "identical_replies": sum(a.output == b.output for a, b in both),
        "successes": (sum(a.success for a, _ in pairs), sum(b.success for _, b in pairs)),
        "escalated_both": len(escalated),
        "identical_escalated": sum(a.output == b.output for a, b in escalated),
        "reused_tokens": reused,
        "answer_tokens": out,
        "reused_share": _rate(reused, out),
        "p50_latency_s": (
            percentile(sorted(a.latency_s for a, _ in escalated), 50),
            percentile(sorted(b.latency_s for _, b in escalated), 50),
        ),
        "p50_answer_attempt_s": (
            percentile(sorted(attempt_latency(a) for a, _ in escalated), 50),
            percentile(sorted(attempt_latency(b) for _, b in escalated), 50),
        ),
        "total_latency_s": (
            sum(a.latency_s for a, _ in escalated), sum(b.latency_s for _, b in escalated)
        ),
    }


def _answering(record: ItemRecord) -> dict[str, Any] | None:
    """The attempt whose answer was returned (the last accepted one)."""
    accepted = [a for a in record.attempts if a.get("outcome") == "accepted"]
    return accepted[-1] if accepted else None


def render_escalation(c: dict[str, Any]) -> str:
    """``compare_escalation`` as a markdown table (verified vs regenerated)."""
    lines = [
        f"| | {c['verify']} (verified) | {c['regen']} (regenerated) |",
        "|---|---|---|",
        f"| items answered by both | {c['items']} | |",
        f"| successes | {c['successes'][0]} | {c['successes'][1]} |",
        f"| identical replies | {c['identical_replies']} of {c['items']} | |",
        f"| escalated in both | {c['escalated_both']} "
        f"({c['identical_escalated']} identical) | |",
        f"| answer tokens reused from the first tier | {c['reused_tokens']} of "
        f"{c['answer_tokens']} ({_pct(c['reused_share'])}) | - |",
        f"| p50 latency, escalated items | {_sec(c['p50_latency_s'][0])} "
        f"| {_sec(c['p50_latency_s'][1])} |",
        f"| p50 answering attempt, escalated items | {_sec(c['p50_answer_attempt_s'][0])} "
        f"| {_sec(c['p50_answer_attempt_s'][1])} |",
        f"| total latency, escalated items | {_sec(c['total_latency_s'][0])} "
        f"| {_sec(c['total_latency_s'][1])} |",
    ]
    return "\n".join(lines)


def _reply_rates(replies: Sequence[ItemRecord]) -> dict[str, float | None]:
    """Per category: schema validity (gateway facts), executable calls (among replies with
    calls) and the share of replies that called any tool (1 - abstention, on irrelevance)."""
    valid = [r.valid for r in replies if r.valid is not None]
    calling = [r.executable_local for r in replies if r.executable_local is not None]
    return {
        "schema_validity_rate": _rate(sum(valid), len(valid)),
        "executable_call_rate": _rate(sum(calling), len(calling)),
        "call_rate": _rate(sum(r.calls > 0 for r in replies), len(replies)),
    }


def _count(values: Iterator[str | None] | Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _usd(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render_table(summaries: Sequence[dict[str, Any]], categories: Sequence[str]) -> str:
    """Markdown tables: the policy metrics, accuracy per category, then validity, executable
    calls and the share of replies with a call per category."""
    head = (
        "| policy | items | accuracy | CPS $ | validity | executable | fallback | p50 s "
        "| p95 s | mean cost $ | tokens in/out | req errors |"
    )
    lines = [head, "|" + "---|" * 12]
    for s in summaries:
        lines.append(
            f"| {s['policy']} | {s['items']} | {_pct(s['accuracy'])} | {_usd(s['cps_usd'])} "
            f"| {_pct(s['schema_validity_rate'])} | {_pct(s['executable_call_rate'])} "
            f"| {_pct(s['fallback_rate'])} | {_sec(s['p50_latency_s'])} "
            f"| {_sec(s['p95_latency_s'])} | {_usd(s['mean_cost_usd'])} "
            f"| {s['prompt_tokens']}/{s['completion_tokens']} | {s['request_errors']} |"
        )
    lines += ["", *_category_table(summaries, categories, _accuracy_cell)]
    lines += ["", "Per category: validity / executable calls / replies with a call", ""]
    lines += _category_table(summaries, categories, _rates_cell)
    return "\n".join(lines)


def _accuracy_cell(got: dict[str, Any]) -> str:
    return f"{_pct(got['accuracy'])} ({got['items']})"


def _rates_cell(got: dict[str, Any]) -> str:
    rates = ("schema_validity_rate", "executable_call_rate", "call_rate")
    return " / ".join(_pct(got.get(r)) for r in rates)


def _category_table(
    summaries: Sequence[dict[str, Any]],
    categories: Sequence[str],
    cell: Callable[[dict[str, Any]], str],
) -> list[str]:
    """A Markdown table, a row per policy and a column per category (``-``: no items)."""
    lines = ["| policy | " + " | ".join(categories) + " |", "|" + "---|" * (1 + len(categories))]
    for s in summaries:
        cells = [
            "-" if (got := s["per_category"].get(c)) is None else cell(got) for c in categories
        ]
        lines.append(f"| {s['policy']} | " + " | ".join(cells) + " |")
    return lines


def simulate_cascade(
    records: Sequence[ItemRecord], signal: str, threshold: float
) -> dict[str, Any] | None:
    """What a cascade at ``threshold`` on ``signal`` would score, from the same items' ``slm``
    and ``llm`` records (greedy decoding makes the LLM's answer inside a cascade the same as
    LLM-only). Escalates an SLM reply that is invalid, not executable, failed, or scores under
    the threshold; ignores early fallback (which only makes escalations cheaper)."""
    slm = {(r.category, r.id): r for r in records if r.policy == "slm"}
    llm = {(r.category, r.id): r for r in records if r.policy == "llm"}
    keys = sorted(set(slm) & set(llm))
    if not keys:
        return None
    ok = escalated = 0
    cost = 0.0
    for key in keys:
        s, big = slm[key], llm[key]
        score = s.signals.get(signal)
        up = (
            s.request_error or s.valid is False or s.executable is False
            or (score is not None and score < threshold)
        )  # fmt: skip
        cost += (s.cost_usd or 0.0) + ((big.cost_usd or 0.0) if up else 0.0)
        ok += int(big.success if up else s.success)
        escalated += int(up)
    return {
        "signal": signal, "threshold": threshold, "items": len(keys),
        "accuracy": ok / len(keys), "fallback_rate": escalated / len(keys),
        "total_cost_usd": cost, "cps_usd": None if ok == 0 else cost / ok,
    }  # fmt: skip


def reprice(
    records: Sequence[ItemRecord], tier: str, price_in_per_mtok: float, price_out_per_mtok: float
) -> list[ItemRecord] | None:
    """The records as if ``tier`` were a hosted model at these per-token prices: each of its
    attempts costs its tokens, every other attempt keeps its measured cost. None when a record
    with a cost lacks per-attempt token counts (a run before they were reported)."""
    out: list[ItemRecord] = []
    for r in records:
        if r.cost_usd is None:
            out.append(replace(r))
            continue
        attempts = []
        for a in r.attempts:
            if a.get("tier") == tier:
                prompt, completion = a.get("prompt_tokens"), a.get("completion_tokens")
                if not isinstance(prompt, int) or not isinstance(completion, int):
                    return None
                price = (prompt * price_in_per_mtok + completion * price_out_per_mtok) / 1e6
                a = {**a, "cost_usd": price}
            attempts.append(a)
        cost = sum(float(a.get("cost_usd") or 0.0) for a in attempts)
        out.append(replace(r, cost_usd=cost, attempts=attempts))
    return out


def label_rows(records: Sequence[ItemRecord], policy: str = "slm") -> list[dict[str, Any]]:
    """Labelled rows for ``slmgate calibrate``: the small model's signals and BFCL's verdict.
    Items whose request failed carry no signals and are left out."""
    return [
        {
            "signals": r.signals,
            "kind": r.kind,
            "confidence": r.confidence,
            "success": r.success,
            "category": r.category,
            "id": r.id,
            "features": r.features,
        }
        for r in records
        if r.policy == policy and not r.request_error
    ]


def record_from_dict(data: dict[str, Any]) -> ItemRecord:
    known = set(ItemRecord.__dataclass_fields__)
    return ItemRecord(**{k: v for k, v in data.items() if k in known})


def parse_price(value: str) -> tuple[float, float, str] | str:
    """``IN/OUT`` ($ per 1M tokens) or a model in LiteLLM's cost map: (in, out, label), or why
    not."""
    if "/" in value and not value.startswith("/"):
        head, _, tail = value.partition("/")
        try:
            return float(head), float(tail), f"${float(head):g} in / ${float(tail):g} out per 1M"
        except ValueError:
            pass  # a provider-prefixed model name such as openai/gpt-4o
    from decoding.litellm_backend import cost_map_prices

    prices = cost_map_prices(value)
    if prices is None:
        return f"{value!r} is neither IN/OUT prices nor in LiteLLM's cost map"
    return prices[0], prices[1], f"{value} (${prices[0]:g} in / ${prices[1]:g} out per 1M)"


def repriced_table(report: dict[str, Any], spec: str) -> str:
    """The policy table again with each ``TIER=PRICE`` tier's attempts priced per token (PRICE:
    a model in LiteLLM's cost map, or IN/OUT $ per 1M tokens; comma-separated for several)."""
    records: list[ItemRecord] | None = [record_from_dict(r) for r in report["records"]]
    labels = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        tier, _, price = part.partition("=")
        parsed = parse_price(price)
        if isinstance(parsed, str):
            return f"--reprice: {parsed}"
        price_in, price_out, label = parsed
        assert records is not None
        records = reprice(records, tier, price_in, price_out)
        if records is None:
            return "--reprice: these records carry no per-attempt token counts"
        labels.append(f"tier {tier} at {label}")
    assert records is not None
    summaries = [summarize(records, p) for p in report["policies"]]
    return f"Repriced: {'; '.join(labels)}\n\n{render_table(summaries, report['categories'])}"


def item_index(item_id: str) -> int:
    """The item's number in its category (``simple_python_12`` -> 12)."""
    return int(item_id.rsplit("_", 1)[1])


def first_prompt_tokens(record: ItemRecord) -> int | None:
    tokens = record.attempts[0].get("prompt_tokens") if record.attempts else None
    return tokens if isinstance(tokens, int) else None


def stream_table(
    records: Sequence[ItemRecord], policies: Sequence[str], bucket: int, baseline: str = "slm"
) -> list[dict[str, Any]]:
    """Accuracy and escalation rate by position in the stream (the item's number in its
    category: items are sent in that order, every category taking turns), per policy, in
    buckets of ``bucket`` item numbers. ``shown``: the share of a policy's requests whose first
    attempt read more prompt tokens than ``baseline``'s answer to the same item (escalation
    memory added demonstrations), when the records carry per-attempt token counts."""
    base = {(r.category, r.id): first_prompt_tokens(r) for r in records if r.policy == baseline}
    start = min((item_index(r.id) for r in records), default=0)
    rows: list[dict[str, Any]] = []
    for policy in policies:
        mine = [r for r in records if r.policy == policy]
        by_bucket: dict[int, list[ItemRecord]] = {}
        for r in mine:
            by_bucket.setdefault((item_index(r.id) - start) // bucket, []).append(r)
        for b in sorted(by_bucket):
            got = by_bucket[b]
            replies = [r for r in got if r.tier is not None]
            compared = [
                (tokens, seen)
                for r in got
                if (tokens := first_prompt_tokens(r)) is not None
                and (seen := base.get((r.category, r.id))) is not None
            ]
            rows.append({
                "policy": policy, "items": f"{start + b * bucket}-{start + (b + 1) * bucket - 1}",
                "n": len(got), "accuracy": sum(r.success for r in got) / len(got),
                "escalated": (sum(r.fallback_reason is not None for r in replies) / len(replies)
                              if replies else None),
                "shown": (sum(t > s for t, s in compared) / len(compared)) if compared else None,
            })  # fmt: skip
    return rows


def render_stream(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| policy | items | n | accuracy | escalated | memory shown |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['items']} | {r['n']} | {_pct(r['accuracy'])} "
            f"| {_pct(r['escalated'])} | {_pct(r['shown'])} |"
        )
    return "\n".join(lines)
