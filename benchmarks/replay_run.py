"""``slmgate replay LOGS``: answer logged requests with a route's small tier through a gateway
and report what the route would have done (``router.replay``).

    slmgate replay requests.jsonl --config slmgate.yaml --route auto --serve --json out.json
    slmgate replay requests.jsonl --config slmgate.yaml --route auto --base-url http://gw:8000

``--config`` gives the route (its tiers, rule and threshold); the requests go to its first tier
by name, greedy unless the log says otherwise. The ledger keeps no request bodies, so logs come
from the client side (a JSONL of request bodies, or of ``{"request", "response", "cost_usd"}``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bfcl_eval import serve_gateway
from gateway.config import load_config
from router.replay import (
    LoggedCall,
    ReplayRow,
    kind_of_body,
    parse_log_line,
    render,
    row_dict,
    summarize,
    wire_agreement,
    would_keep,
)
from router.route import Route


def load_log(path: Path) -> list[tuple[int, LoggedCall]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            out.append((n, parse_log_line(line, n)))
    return out


def replay_one(client: httpx.Client, route: Route, n: int, call: LoggedCall) -> ReplayRow:
    kind = kind_of_body(call.request)
    body = {**call.request, "model": route.tiers[0], "stream": False}
    try:
        r = client.post("/v1/chat/completions", json=body)
        reply = r.json()
        if r.status_code != 200 or not isinstance(reply, dict):
            raise ValueError(f"HTTP {r.status_code}")
    except (httpx.HTTPError, ValueError) as exc:
        return ReplayRow(n, kind, False, "slm_error", None, 0.0, call.cost_usd, str(exc)[:200])
    facts = reply.get("slmgate") if isinstance(reply.get("slmgate"), dict) else {}
    assert isinstance(facts, dict)
    kept, reason = would_keep(route, kind, facts)
    agreed = wire_agreement(kind, call.response, reply) if kept else None
    cost = facts.get("cost_usd")
    slm_cost = float(cost) if isinstance(cost, int | float) else 0.0
    return ReplayRow(n, kind, kept, reason, agreed, slm_cost, call.cost_usd)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slmgate replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("log", type=Path, help="JSONL of request bodies or {request, response}")
    p.add_argument("--config", required=True, help="the config whose route is audited")
    p.add_argument("--route", default="auto")
    p.add_argument("--base-url", default=None, help="a running gateway (else --serve)")
    p.add_argument("--serve", action="store_true", help="start `slmgate serve --config`")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", type=Path, default=None, help="write the summary and every row")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request: the bar says it
    try:
        config = load_config(args.config)
        log = load_log(args.log)
    except (OSError, ValueError, TypeError) as exc:
        print(f"slmgate replay: {exc}", file=sys.stderr)
        return 2
    routes = {r.name: r for r in config.routes}
    route = routes.get(args.route)
    if route is None:
        print(f"slmgate replay: no route {args.route!r} in {args.config}", file=sys.stderr)
        return 2
    rows: list[ReplayRow] = []
    with contextlib.ExitStack() as stack:
        base = args.base_url
        if base is None or args.serve:
            base = stack.enter_context(serve_gateway(args.config, args.ready_timeout))
        headers = {"Authorization": f"Bearer {args.api_key}"}
        with httpx.Client(base_url=base.rstrip("/"), headers=headers, timeout=args.timeout) as c:
            for i, (n, call) in enumerate(log, 1):
                rows.append(replay_one(c, route, n, call))
                if not args.quiet:
                    done = int(30 * i / len(log))
                    print(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{len(log)}", end="",
                          file=sys.stderr, flush=True)  # fmt: skip
    if not args.quiet:
        print(file=sys.stderr)
    summary = summarize(rows)
    print(f"route {route.name}: {' -> '.join(route.tiers)} ({route.policy}), log {args.log}")
    print(render(summary))
    if args.json:
        report: dict[str, Any] = {"summary": summary, "rows": [row_dict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
