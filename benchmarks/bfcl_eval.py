"""BFCL through a live gateway (``slmgate eval bfcl``): accuracy and cost per successful task for
each routing policy.

Every BFCL item is sent once per policy (the policy is the request's model name: ``slm``,
``llm``, ``auto`` = cascade, ``pre`` = pre-router), interleaved item by item so drift on a shared
machine hits every policy alike. BFCL's own AST checker scores each reply
(``benchmarks.bfcl_data``); the verdict goes back to the gateway as the task's outcome. Per
policy: accuracy (overall and per category), CPS = total cost / successful items, schema
validity rate and fallback rate (from the gateway's ``slmgate`` facts), executable call rate
(checked here with jsonschema), p50/p95 client latency, mean cost and tokens.

    python -m benchmarks.bfcl_eval --serve --limit 3 --policies slm,llm --json bfcl.json
    python -m benchmarks.bfcl_eval --base-url http://127.0.0.1:8000 --labels labels.jsonl

A request that fails (HTTP error, timeout, bad body) is recorded as a failed item with its
error type; the run goes on. ``--resume`` keeps the records of an earlier ``--json`` file and
only sends what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import bfcl_data
from router.stats import percentile

DEFAULT_POLICIES = ("slm", "llm", "auto", "pre")
SYSTEM_PROMPT = "Call the provided functions when they answer the request; otherwise reply briefly."
CHECKPOINT_EVERY = 2  # items between partial --json writes (also written on SIGTERM)


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

    @property
    def key(self) -> tuple[str, str, str]:
        return self.category, self.id, self.policy


# ---- pure parts (unit-tested) ------------------------------------------------------------------


def round_robin(per_category: Sequence[Sequence[bfcl_data.BfclItem]]) -> list[bfcl_data.BfclItem]:
    """Items taking turns across categories, so a run stopped early covers every category."""
    out: list[bfcl_data.BfclItem] = []
    for i in range(max((len(c) for c in per_category), default=0)):
        out += [c[i] for c in per_category if i < len(c)]
    return out


def task_id(category: str, item_id: str, policy: str, run_id: str) -> str:
    return f"bfcl-{category}-{item_id}-{policy}-{run_id}"


def build_request(
    item: bfcl_data.BfclItem,
    tools: list[dict[str, Any]],
    policy: str,
    max_tokens: int,
    system_prompt: str = SYSTEM_PROMPT,
) -> dict[str, Any]:
    """The chat-completions body for one item: BFCL's first turn, a minimal system prompt
    (unless the item brings its own or ``system_prompt`` is empty), greedy, tools on auto."""
    messages = list(item.messages)
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {
        "model": policy,
        "messages": messages,
        "tools": tools,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def request_features(body: dict[str, Any]) -> dict[str, float]:
    """The pre-router's features of a request body, so labels can train it
    (``slmgate calibrate --pre-out``); empty when the body does not parse."""
    from router.pre import features_of
    from router.request import generation_request
    from schemas.chat import ChatCompletionRequest

    try:
        return features_of(generation_request(ChatCompletionRequest.model_validate(body), "x"))
    except Exception:
        return {}


def _opt_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _opt_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def apply_facts(record: ItemRecord, body: dict[str, Any]) -> None:
    """Copy the gateway's ``slmgate`` facts and token usage into ``record``; a field that is
    missing or of the wrong type stays None (the facts are an extension, not a promise)."""
    facts = body.get("slmgate")
    facts = facts if isinstance(facts, dict) else {}
    record.tier = _opt_str(facts.get("tier"))
    record.model = _opt_str(facts.get("model"))
    record.route = _opt_str(facts.get("route"))
    record.valid = _opt_bool(facts.get("valid"))
    record.executable = _opt_bool(facts.get("executable"))
    record.cost_usd = _opt_float(facts.get("cost_usd"))
    record.counterfactual_cost_usd = _opt_float(facts.get("counterfactual_cost_usd"))
    record.fallback_reason = _opt_str(facts.get("fallback_reason"))
    record.confidence = _opt_float(facts.get("confidence"))
    signals = facts.get("signals")
    if isinstance(signals, dict):
        record.signals = {str(k): f for k, v in signals.items() if (f := _opt_float(v)) is not None}
    attempts = facts.get("attempts")
    record.attempts = (
        [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []
    )
    usage = body.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    record.prompt_tokens = _opt_int(usage.get("prompt_tokens"))
    record.completion_tokens = _opt_int(usage.get("completion_tokens"))


def judge(
    record: ItemRecord,
    item: bfcl_data.BfclItem,
    body: dict[str, Any],
    tools: list[dict[str, Any]],
    names: dict[str, str],
) -> None:
    """Fill ``record`` from a 200 reply: gateway facts, BFCL's verdict, the local executable
    check."""
    apply_facts(record, body)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        record.success, record.request_error = False, True
        record.error_type, record.error = "request:no_choices", str(body)[:200]
        return
    message = choices[0].get("message")
    calls = bfcl_data.tool_calls_of(message if isinstance(message, dict) else {})
    record.calls = len(calls or [])
    verdict = bfcl_data.score(item, calls, names)
    record.success, record.error_type = verdict.success, verdict.error_type
    record.error = "; ".join(verdict.errors)[:300] or None
    record.executable_local = bfcl_data.executable(calls, tools)


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


def label_rows(records: Sequence[ItemRecord], policy: str = "slm") -> list[dict[str, Any]]:
    """Labelled rows for ``slmgate calibrate``: the small model's signals and BFCL's verdict.
    Items whose request failed carry no signals and are left out."""
    return [
        {
            "signals": r.signals,
            "kind": "tools",
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


# ---- I/O ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_gateway(config: str | None, ready_timeout_s: float) -> Iterator[str]:
    """Start ``slmgate serve`` on a free port and yield its base URL once ``/readyz`` says 200."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if config:
        cmd += ["--config", config]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"slmgate serve exited with {proc.returncode} during startup")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"slmgate serve not ready after {ready_timeout_s:.0f} s")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_item(
    client: httpx.Client,
    item: bfcl_data.BfclItem,
    policy: str,
    run_id: str,
    max_tokens: int,
    system_prompt: str = SYSTEM_PROMPT,
) -> ItemRecord:
    """Send one item under one policy, score it, report the outcome. Never raises for a request
    or reply problem: that becomes the record's error."""
    tid = task_id(item.category, item.id, policy, run_id)
    record = ItemRecord(item.category, item.id, policy, tid, success=False)
    tools, names = bfcl_data.openai_tools(item.functions)
    body = build_request(item, tools, policy, max_tokens, system_prompt)
    record.features = request_features(body)
    started = time.perf_counter()
    try:
        response = client.post("/v1/chat/completions", json=body, headers={"X-Task-Id": tid})
        record.latency_s = time.perf_counter() - started
        if response.status_code != 200:
            record.request_error = True
            record.error_type = f"http_{response.status_code}"
            record.error = response.text[:300]
            return record
        reply = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        record.latency_s = time.perf_counter() - started
        record.request_error = True
        record.error_type, record.error = f"request:{type(exc).__name__}", str(exc)[:300]
        return record
    if not isinstance(reply, dict):
        record.request_error, record.error_type = True, "request:bad_body"
        return record
    judge(record, item, reply, tools, names)
    with contextlib.suppress(httpx.HTTPError):  # 404 until the gateway has outcomes: fine
        client.post(f"/v1/tasks/{tid}/outcome", json={"success": record.success})
    return record


def warm_up(
    client: httpx.Client, item: bfcl_data.BfclItem, policy: str, max_tokens: int,
    system_prompt: str = SYSTEM_PROMPT,
) -> None:  # fmt: skip
    """One unscored request per policy before timing, so one-off first-request costs (grammar
    and tokenizer set-up) do not land in the first item's latency. Its failure is ignored."""
    tools, _ = bfcl_data.openai_tools(item.functions)
    body = build_request(item, tools, policy, max_tokens, system_prompt)
    with contextlib.suppress(httpx.HTTPError):
        client.post("/v1/chat/completions", json=body)


def _report(
    records: list[ItemRecord],
    policies: Sequence[str],
    categories: Sequence[str],
    meta: dict[str, Any],
    partial: bool,
) -> dict[str, Any]:
    summaries = [summarize(records, p) for p in policies]
    return {
        **meta,
        "partial": partial,
        "summaries": summaries,
        "records": [asdict(r) for r in records],
    }


def _write_json(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def _run_logged(
    client: httpx.Client, item: bfcl_data.BfclItem, policy: str, args: argparse.Namespace,
    total: int, done: int,
) -> ItemRecord:  # fmt: skip
    r = run_item(client, item, policy, args.run_id, args.max_tokens, args.system_prompt)
    if not args.quiet:
        verdict = "ok" if r.success else f"no ({r.error_type})"
        print(f"[{done + 1}/{total}] {item.id} {policy}: {verdict}, tier {r.tier}, "
              f"{r.latency_s:.2f} s", file=sys.stderr)  # fmt: skip
    return r


def evaluate(
    args: argparse.Namespace, base_url: str, transport: httpx.BaseTransport | None = None
) -> dict[str, Any]:
    """Run every (item, policy) pair not already in ``--json`` (with ``--resume``), checkpointing
    to ``--json`` as it goes; the report has the summaries and every record."""
    categories = bfcl_data.resolve_categories(args.categories.split(","))
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    meta = {
        "base_url": base_url,
        "run_id": args.run_id,
        "categories": categories,
        "policies": policies,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "warmup": args.warmup,
        "system_prompt": args.system_prompt,
        "bfcl_eval_version": _version("bfcl-eval"),
    }
    items = round_robin([bfcl_data.load_items(c, args.limit, args.offset) for c in categories])
    planned = {(it.category, it.id, p) for it in items for p in policies}
    records: list[ItemRecord] = []
    if args.resume and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        records = [record_from_dict(r) for r in old.get("records", [])]
        records = [r for r in records if not r.request_error and r.key in planned]
    done = {r.key for r in records}
    total, sent = len(items) * len(policies), 0
    headers = {"Authorization": f"Bearer {args.api_key}"}
    client = httpx.Client(
        base_url=base_url, headers=headers, timeout=args.timeout, transport=transport
    )
    with client:
        for policy in policies if items and args.warmup else ():
            warm_up(client, items[0], policy, args.max_tokens, args.system_prompt)
        try:
            for n, item in enumerate(items, 1):
                for policy in policies:
                    if (item.category, item.id, policy) not in done:
                        records.append(_run_logged(client, item, policy, args, total, len(records)))
                        sent += 1
                if args.json and n % CHECKPOINT_EVERY == 0 and sent:
                    _write_json(args.json, _report(records, policies, categories, meta, True))
        except (KeyboardInterrupt, Terminated):  # keep what was done, for --resume
            if args.json:
                _write_json(args.json, _report(records, policies, categories, meta, True))
            raise
    return _report(records, policies, categories, meta, False)


class Terminated(Exception):
    """SIGTERM, raised in the main thread so a stopped run still writes its records."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="slmgate eval bfcl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base-url", default=None, help="a running gateway; without it, --serve starts one"
    )
    p.add_argument("--serve", action="store_true", help="start `slmgate serve` on a free port")
    p.add_argument("--config", default=None, help="config file for --serve")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for --serve")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help="model names to compare, comma-separated",
    )
    p.add_argument(
        "--categories",
        default=",".join(bfcl_data.DEFAULT_CATEGORIES),
        help=f"BFCL categories; supported: {', '.join(bfcl_data.SUPPORTED_CATEGORIES)}",
    )
    p.add_argument("--limit", type=int, default=None, help="items per category (default all)")
    p.add_argument("--offset", type=int, default=0, help="skip this many items per category")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one unscored request per policy first (default on)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="'' sends none")
    p.add_argument("--run-id", default=time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
    p.add_argument("--json", type=Path, default=None, help="write summaries and every record")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="write JSONL labelled rows (slm policy) for `slmgate calibrate`",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the records already in --json and send only the missing items",
    )
    p.add_argument("--quiet", action="store_true", help="no per-item progress on stderr")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    try:
        bfcl_data.resolve_categories(args.categories.split(","))
    except ValueError as exc:
        p.error(str(exc))
    if args.labels and "slm" not in args.policies.split(","):
        p.error("--labels needs the slm policy in --policies")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_terminated)
    with contextlib.ExitStack() as stack:
        base = args.base_url
        if base is None or args.serve:
            base = stack.enter_context(serve_gateway(args.config, args.ready_timeout))
        report = evaluate(args, base.rstrip("/"))
    records = [record_from_dict(r) for r in report["records"]]
    print(
        f"BFCL {report['bfcl_eval_version']} via {report['base_url']}, run {args.run_id}, "
        f"limit {args.limit} per category, max_tokens {args.max_tokens}"
    )
    print(render_table(report["summaries"], report["categories"]))
    if args.json:
        _write_json(args.json, report)
    if args.labels:
        rows = label_rows(records)
        args.labels.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
