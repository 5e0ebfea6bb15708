"""BFCL through a live gateway (``slmgate eval bfcl``): accuracy and cost per successful task for
each routing policy.

Every BFCL item is sent once per policy (the policy is the request's model name: ``slm``,
``llm``, ``auto`` = cascade, ``pre`` = pre-router), interleaved item by item so drift on a shared
machine hits every policy alike (``--concurrency N`` keeps that order, N requests in flight).
BFCL's own AST checker scores each reply
(``benchmarks.bfcl_data``); the verdict goes back to the gateway as the task's outcome. Per
policy: accuracy (overall and per category), CPS = total cost / successful items, schema
validity rate and fallback rate (from the gateway's ``slmgate`` facts), executable call rate
(checked here with jsonschema), p50/p95 client latency, mean cost and tokens.

    python -m benchmarks.bfcl_eval --serve --limit 3 --policies slm,llm --json bfcl.json
    python -m benchmarks.bfcl_eval --base-url http://127.0.0.1:8000 --labels labels.jsonl

``--format json`` asks for the same call as a structured output instead: items with one function
only, no tools, ``response_format`` a JSON schema of the function's parameters, the reply's
JSON read as the arguments of that call and scored by the same checker. That is the deferral
rule's ``json`` kind of request (``--labels`` rows say which kind they are).

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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks import bfcl_data
from benchmarks.bfcl_report import (
    ItemRecord,
    compare_escalation,
    label_rows,
    record_from_dict,
    render_escalation,
    render_stream,
    render_table,
    reprice,
    repriced_table,
    simulate_cascade,
    stream_table,
    summarize,
)

DEFAULT_POLICIES = ("slm", "llm", "auto", "pre")
SYSTEM_PROMPT = "Call the provided functions when they answer the request; otherwise reply briefly."
CHECKPOINT_EVERY = 2  # items between partial --json writes (also written on SIGTERM)


__all__ = [
    "ItemRecord", "label_rows", "record_from_dict", "render_stream", "render_table", "reprice",
    "repriced_table", "simulate_cascade", "stream_table", "summarize",
]  # fmt: skip

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


JSON_SYSTEM_PROMPT = (
    "Reply with the arguments of one call to the function `{name}` as a JSON object. "
    "The function: {description}"
)


def build_json_request(
    item: bfcl_data.BfclItem, tools: list[dict[str, Any]], policy: str, max_tokens: int
) -> dict[str, Any]:
    """The body for ``--format json``: the item's one function as a JSON schema to fill in
    (``response_format``), no tools; the system prompt names the function."""
    if len(tools) != 1:
        raise ValueError(f"{item.id}: --format json needs an item with one function")
    fn = tools[0]["function"]
    system = JSON_SYSTEM_PROMPT.format(name=fn["name"], description=fn.get("description", ""))
    messages = [m for m in item.messages if m.get("role") != "system"]
    return {
        "model": policy,
        "messages": [{"role": "system", "content": system}, *messages],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": fn["name"], "schema": fn["parameters"]}},
        "temperature": 0,
        "max_tokens": max_tokens,
    }  # fmt: skip


def json_calls(message: dict[str, Any], tools: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A ``--format json`` reply as the one call it stands for: (the function, its content)."""
    return [(tools[0]["function"]["name"], str(message.get("content") or ""))]


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


def numeric_signals(facts: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of the ``slmgate`` facts' ``signals`` (others dropped)."""
    signals = facts.get("signals")
    if not isinstance(signals, dict):
        return {}
    return {str(k): f for k, v in signals.items() if (f := _opt_float(v)) is not None}


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
    shown = facts.get("memory_examples")
    record.memory_examples = len(shown) if isinstance(shown, list) else None
    record.signals = numeric_signals(facts)
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
    if record.kind == "json":  # the content is the arguments of the item's one function
        message = {"tool_calls": [{"function": {"name": n, "arguments": a}}
                                  for n, a in json_calls(message or {}, tools)]}  # fmt: skip
    if isinstance(message, dict):  # the reply as sent, to compare policies item by item
        wire_calls = [c.get("function") for c in message.get("tool_calls") or []
                      if isinstance(c, dict)]  # fmt: skip
        record.output = json.dumps({"content": message.get("content"), "calls": wire_calls},
                                   sort_keys=True)  # fmt: skip
    calls = bfcl_data.tool_calls_of(message if isinstance(message, dict) else {})
    record.calls = len(calls or [])
    verdict = bfcl_data.score(item, calls, names)
    record.success, record.error_type = verdict.success, verdict.error_type
    record.error = "; ".join(verdict.errors)[:300] or None
    record.executable_local = bfcl_data.executable(calls, tools)


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
    fmt: str = "tools",
) -> ItemRecord:
    """Send one item under one policy, score it, report the outcome. Never raises for a request
    or reply problem: that becomes the record's error."""
    tid = task_id(item.category, item.id, policy, run_id)
    record = ItemRecord(item.category, item.id, policy, tid, success=False, kind=fmt)
    tools, names = bfcl_data.openai_tools(item.functions)
    if fmt == "json":
        body = build_json_request(item, tools, policy, max_tokens)
    else:
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
    r = run_item(client, item, policy, args.run_id, args.max_tokens, args.system_prompt,
                 args.format)  # fmt: skip
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
        "concurrency": args.concurrency,
        "system_prompt": args.system_prompt,
        "format": args.format,
        "bfcl_eval_version": _version("bfcl-eval"),
    }
    items = round_robin([bfcl_data.load_items(c, args.limit, args.offset) for c in categories])
    if args.format == "json":  # one function to fill in, and a call expected
        items = [it for it in items
                 if len(it.functions) == 1 and not bfcl_data.is_relevance(it.category)]  # fmt: skip
    planned = {(it.category, it.id, p) for it in items for p in policies}
    records: list[ItemRecord] = []
    if args.resume and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        records = [record_from_dict(r) for r in old.get("records", [])]
        records = [r for r in records if not r.request_error and r.key in planned]
    done = {r.key for r in records}
    total = len(items) * len(policies)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    client = httpx.Client(
        base_url=base_url, headers=headers, timeout=args.timeout, transport=transport
    )
    pending = [(it, p) for it in items for p in policies if (it.category, it.id, p) not in done]
    with client:
        for policy in policies if items and args.warmup and args.format == "tools" else ():
            warm_up(client, items[0], policy, args.max_tokens, args.system_prompt)
        pool = ThreadPoolExecutor(max_workers=args.concurrency)
        try:
            # Submitted in the interleaved order, so at most `concurrency` neighbours run at once.
            futures = [
                pool.submit(_run_logged, client, item, policy, args, total, len(done) + i)
                for i, (item, policy) in enumerate(pending)
            ]
            for n, future in enumerate(as_completed(futures), 1):
                records.append(future.result())
                if args.json and n % (CHECKPOINT_EVERY * len(policies)) == 0:
                    _write_json(args.json, _report(records, policies, categories, meta, True))
        except (KeyboardInterrupt, Terminated):  # keep what was done, for --resume
            pool.shutdown(wait=False, cancel_futures=True)
            if args.json:
                _write_json(args.json, _report(records, policies, categories, meta, True))
            raise
        pool.shutdown()
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
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight at once (a batching gateway serves them together; latencies "
        "are then under that load)",
    )
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="'' sends none")
    p.add_argument("--run-id", default=time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
    p.add_argument("--json", type=Path, default=None, help="write summaries and every record")
    p.add_argument("--format", choices=("tools", "json"), default="tools",
                   help="tools offered (default), or one function's arguments as a JSON schema")
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
    p.add_argument(
        "--reprice",
        default=None,
        metavar="TIER=PRICE[,...]",
        help="also report every policy with TIER's attempts priced per token: PRICE is a hosted "
        "model in LiteLLM's cost map (llm=gpt-4o) or IN/OUT $ per 1M tokens (slm=0.8/2.4); "
        "other tiers keep their measured cost",
    )
    p.add_argument(
        "--stream",
        default=None,
        metavar="POLICIES",
        help="also report accuracy and escalations by position in the stream for these "
        "policies (comma-separated; e.g. a route with escalation memory and one without)",
    )
    p.add_argument("--stream-bucket", type=int, default=10, help="item numbers per row")
    p.add_argument(
        "--compare-escalation",
        default=None,
        metavar="VERIFY,REGEN",
        help="also compare two cascades that differ only in verify_escalation: identical "
        "replies, tokens reused from the first tier, latency of the items both escalated",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="send nothing: report the records already in --json (with --reprice, say)",
    )
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    try:
        bfcl_data.resolve_categories(args.categories.split(","))
    except ValueError as exc:
        p.error(str(exc))
    if args.labels and "slm" not in args.policies.split(","):
        p.error("--labels needs the slm policy in --policies")
    if args.reprice is not None and "=" not in args.reprice:
        p.error("--reprice takes TIER=PRICE, e.g. llm=gpt-4o or slm=0.8/2.4")
    if args.report_only and not (args.json and args.json.exists()):
        p.error("--report-only needs an existing --json file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_terminated)
    if args.report_only:
        report = json.loads(args.json.read_text())
        report["summaries"] = [
            summarize([record_from_dict(r) for r in report["records"]], p)
            for p in report["policies"]
        ]
    else:
        with contextlib.ExitStack() as stack:
            base = args.base_url
            if base is None or args.serve:
                base = stack.enter_context(serve_gateway(args.config, args.ready_timeout))
            report = evaluate(args, base.rstrip("/"))
    records = [record_from_dict(r) for r in report["records"]]
    print(
        f"BFCL {report['bfcl_eval_version']} via {report['base_url']}, run {report['run_id']}, "
        f"limit {report['limit']} per category, max_tokens {report['max_tokens']}"
    )
    print(render_table(report["summaries"], report["categories"]))
    if args.reprice:
        print("\n" + repriced_table(report, args.reprice))
    if args.stream:
        chosen = [p.strip() for p in args.stream.split(",") if p.strip()]
        print("\nBy position in the stream\n")
        print(render_stream(stream_table(records, chosen, args.stream_bucket)))
    if args.compare_escalation:
        verify, regen = [p.strip() for p in args.compare_escalation.split(",")][:2]
        print("\nVerified vs regenerated escalation\n")
        print(render_escalation(compare_escalation(records, verify, regen)))
    if args.json and not args.report_only:
        _write_json(args.json, report)
    if args.labels:
        rows = label_rows(records)
        args.labels.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
