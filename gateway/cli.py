"""The ``slmgate`` command: serve, models, keys, bench, calibrate, replay, eval."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from decoding.models import ModelSpec
    from router.deferral import DeferralRule
    from router.pre import PreRouter


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.config import load_config
    from gateway.logfilter import uvicorn_log_config

    try:
        config = load_config(args.config)
    except (OSError, ValueError, TypeError) as exc:  # a bad file: one line, not a traceback
        print(f"slmgate: invalid config: {exc}", file=sys.stderr)
        return 2
    host = args.host or config.host
    port = args.port or config.port
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per upstream call
    for m in config.models:
        if m.kind != "embedded":
            where = m.base_url or (m.launch and f"launched from {m.launch.model}") or m.kind
            logging.getLogger("slmgate").info("model %s (%s tier): %s %s", m.name, m.tier,
                                              m.kind, where)  # fmt: skip
            continue
        logging.getLogger("slmgate").info(
            "model %s (%s tier): %s, dtype %s, device %s", m.name, m.tier, m.source,
            m.resolved_dtype(), m.resolved_device(),
        )  # fmt: skip
    # The access log never shows a secret passed in a URL (keys are refused there anyway).
    uvicorn.run(create_app(config), host=host, port=port, log_level=args.log_level,
                log_config=uvicorn_log_config())  # fmt: skip
    return 0


def _models(args: argparse.Namespace) -> int:
    from decoding.loader import default_cache_dir
    from decoding.models import BUILTIN_SOURCES
    from gateway.config import load_config

    config = load_config(args.config)
    cache = default_cache_dir() if config.cache_dir is None else Path(config.cache_dir)
    key = config.api_keys[0] if config.api_keys else None
    servers = _gateway_servers(args.url, key) if args.url else {}
    for m in config.models:
        if m.kind == "vllm":
            print(f"{m.name:8s} tier={m.tier:4s} vllm {_vllm_state(m, servers.get(m.name))}")
            continue
        if m.kind != "embedded":
            print(f"{m.name:8s} tier={m.tier:4s} {m.kind} {m.remote_model} at {m.base_url or '-'}")
            continue
        source = BUILTIN_SOURCES.get(m.source)
        cached = source is not None and (cache / "models" / source.sha256 / "config.json").exists()
        state = "converted in cache" if cached else "not converted yet (first load ~30-90 s)"
        if source is None:
            state = "local directory"
        print(f"{m.name:8s} tier={m.tier:4s} {m.source}  dtype={m.resolved_dtype()} "
              f"device={m.resolved_device()}  [{state}]")  # fmt: skip
    for r in config.routes:
        print(f"route {r.name}: {' -> '.join(r.tiers)} ({r.policy})")
    return 0


def _gateway_servers(url: str, key: str | None) -> dict[str, dict[str, Any]]:
    """The launched servers a running gateway reports on ``/readyz`` (asked with the config's
    first API key, as the gateway wants one)."""
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else None
    try:
        body = httpx.get(url.rstrip("/") + "/readyz", headers=headers, timeout=5).json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"slmgate: cannot read {url}/readyz: {exc}", file=sys.stderr)
        return {}
    servers = body.get("servers") if isinstance(body, dict) else None
    return servers if isinstance(servers, dict) else {}


def _vllm_state(m: ModelSpec, server: dict[str, Any] | None) -> str:
    """One line on a vLLM tier: a launched one's state as its gateway reports it, or whether
    a server reached by URL answers its health check now."""
    import httpx

    if m.launch is not None:
        where = f"launched from {m.launch.model} with {m.launch.interpreter()}"
        if server is None:
            return f"{where}  [state: ask a running gateway with --url]"
        return (f"{where}  [{server.get('state')}, pid {server.get('pid')}, port "
                f"{server.get('port')}, restarts {server.get('restarts')}]")  # fmt: skip
    root = (m.base_url or "").rstrip("/").removesuffix("/v1")
    try:
        up = httpx.get(root + "/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        up = False
    return f"{m.served_model_name()} at {m.base_url}  [{'up' if up else 'down'}]"


BENCHMARKS = {
    "grammar": "benchmarks.grammar_bench",
    "gateway": "benchmarks.gateway_bench",
    "spec": "benchmarks.spec_bench",
    "ledger": "benchmarks.ledger_bench",
    "soak": "benchmarks.soak_bench",
    "serve": "benchmarks.serve_bench",
    "tiers": "benchmarks.tiers_bench",
    "decode": "benchmarks.decode_bench",
    "backends": "benchmarks.backends_bench",
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.what])
    result: int = module.main(args.rest)
    return result


def _load_labels(path: str) -> list[dict[str, object]]:
    import json

    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or "success" not in row:
                    raise SystemExit(f"{path}:{n}: each row needs 'signals' and 'success'")
                rows.append(row)
    return rows


def _labelled(row: dict[str, object]) -> tuple[str, dict[str, float], bool]:
    """One labels-file row as (kind, signals, success)."""
    signals = row.get("signals") or {}
    assert isinstance(signals, dict)
    kind = str(row.get("kind", "tools"))
    return kind, {k: float(v) for k, v in signals.items()}, bool(row["success"])


def _calibrate(args: argparse.Namespace) -> int:
    """Thresholds from labelled SLM answers (an eval's --labels file or the ledger's reported
    task outcomes), printed as a table and as the route settings to paste into the config."""
    import json

    from router.calibrate import calibrate_all
    from router.confidence import SIGNALS

    labelled: list[tuple[dict[str, float], bool]] = []
    features: list[tuple[dict[str, float], bool]] = []
    kinds: list[str] = []
    if args.labels:
        for row in _load_labels(args.labels):
            kind, values, ok = _labelled(row)
            labelled.append((values, ok))
            kinds.append(kind)
            feats = row.get("features")
            if isinstance(feats, dict):
                features.append(({k: float(v) for k, v in feats.items()}, ok))
    else:
        from router.ledger import Ledger

        ledger = Ledger(args.ledger)
        ledger.start()
        try:
            rows = ledger.calibration_rows(args.route, args.tier, args.window)
        finally:
            ledger.close()
        labelled = [(signals, ok) for signals, _, ok, _ in rows]
        kinds = [kind for *_, kind in rows]
    if not labelled:
        print("no labelled rows: run `slmgate eval bfcl --labels FILE` or report task outcomes")
        return 1
    signals = SIGNALS if args.signal == "all" else (args.signal,)
    results = calibrate_all(
        labelled, signals=signals, max_fallback_rate=args.target_fallback_rate,
        min_success_rate=args.target_success_rate,
    )  # fmt: skip
    print(f"{len(labelled)} labelled rows; target "
          f"{results[0].target if results else '-'}")  # fmt: skip
    print(f"{'signal':24s} {'threshold':>9s} {'fallback':>8s} {'kept ok':>8s} {'slm ok':>7s} "
          f"{'AUROC':>6s} met")  # fmt: skip
    for c in results:
        kept = "-" if c.kept_success_rate is None else f"{c.kept_success_rate:.3f}"
        auc = "-" if c.auroc is None else f"{c.auroc:.3f}"
        print(f"{c.signal:24s} {c.threshold:9.4f} {c.fallback_rate:8.3f} {kept:>8s} "
              f"{c.slm_success_rate:7.3f} {auc:>6s} {'yes' if c.met else 'no'}")  # fmt: skip
    best = results[0]
    print(f"\nroute settings ({args.route}):\n  policy: cascade\n  signal: {best.signal}\n"
          f"  threshold: {best.threshold:.4f}")  # fmt: skip
    out: dict[str, object] = {"route": args.route, "calibrations": [c.to_dict() for c in results]}
    if args.pre_out:
        from router.pre import PreRouter, fit

        if not features:
            print("no 'features' in the labels: cannot fit the pre-router")
            return 1
        pre = PreRouter(fit(features), threshold=args.pre_threshold, trained_on=len(features))
        pre.save(args.pre_out)
        print(f"pre-router fitted on {len(features)} rows -> {args.pre_out}")
        out["pre_router"] = args.pre_out
        if args.holdout:
            out["pre_holdout"] = _print_pre_holdout(pre, args.holdout)
    if args.deferral_out:
        from router.deferral import KINDS, fit_rule

        pairs = zip(kinds, labelled, strict=True)
        kinded = [(k, v, ok) for k, (v, ok) in pairs if k in KINDS]
        rule, report = fit_rule(kinded, min_success_rate=args.target_success_rate,
                                max_fallback_rate=args.target_fallback_rate)  # fmt: skip
        rule.save(args.deferral_out)
        for kind, r in report.items():
            head = f"deferral {kind}: {r['rows']} rows"
            if r["fitted"]:
                print(f"{head}, AUROC {r['auroc']:.3f} (on these rows), threshold "
                      f"{r['threshold']:.4f}, fallback {r['fallback_rate']:.3f}")  # fmt: skip
            else:
                print(f"{head}, not fitted (needs successes and failures)")
        print(f"deferral rule -> {args.deferral_out} (route setting `deferral: PATH`)")
        out["deferral"] = {"path": args.deferral_out, "report": report}
        if args.holdout:
            out["holdout"] = _print_holdout(rule, args.holdout)
    if args.score_rule:  # an existing rule (a file, or the bundled one) on the held-out labels
        from router.deferral import BUNDLED_RULE_PATH, DeferralRule

        path = BUNDLED_RULE_PATH if args.score_rule == "default" else args.score_rule
        print(f"rule {args.score_rule} ({path}):")
        out["scored_rule"] = {"path": str(path),
                              "holdout": _print_holdout(DeferralRule.load(path), args.holdout)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _print_holdout(rule: DeferralRule, path: str) -> dict[str, Any]:
    """The fitted rule scored on held-out labels, next to every single signal."""
    from router.confidence import SIGNALS
    from router.deferral import KINDS, holdout_report

    rows = [labelled for row in _load_labels(path) if (labelled := _labelled(row))[0] in KINDS]
    report = holdout_report(rule, rows, SIGNALS)  # type: ignore[arg-type]  # kinds checked
    for kind, r in report.items():
        if "rule_auroc" in r:
            auc = "-" if r["rule_auroc"] is None else f"{r['rule_auroc']:.3f}"
            kept = "-" if r["kept_success_rate"] is None else f"{r['kept_success_rate']:.3f}"
            print(f"held out {kind}: {r['rows']} rows, rule AUROC {auc}, fallback "
                  f"{r['fallback_rate']:.3f}, kept ok {kept} (all {r['success_rate']:.3f})")
        else:
            print(f"held out {kind}: {r['rows']} rows, no model for this kind in the rule")
        ranked = sorted(((a, n) for n, a in r["single"].items() if a is not None), reverse=True)
        print("  single: " + ", ".join(f"{n} {a:.3f}" for a, n in ranked))
    return report


def _print_pre_holdout(pre: PreRouter, path: str) -> dict[str, Any]:
    """The pre-router on held-out labels: how well its score ranks the small model's successes
    from the request alone, and what it would send to the large tier."""
    from router.calibrate import auroc

    scored = []
    for row in _load_labels(path):
        feats = row.get("features")
        if isinstance(feats, dict):
            values = {k: float(v) for k, v in feats.items()}
            scored.append((pre.score(values), bool(row["success"])))
    small = [ok for p, ok in scored if p >= pre.threshold]
    report = {
        "rows": len(scored),
        "auroc": auroc(scored),
        "to_large": 1 - len(small) / len(scored) if scored else None,
        "kept_success_rate": sum(small) / len(small) if small else None,
        "success_rate": sum(ok for _, ok in scored) / len(scored) if scored else None,
    }
    fmt = {k: "-" if v is None else f"{v:.3f}" for k, v in report.items() if k != "rows"}
    print(f"pre-router held out: {report['rows']} rows, AUROC {fmt['auroc']}, to the large tier "
          f"{fmt['to_large']}, small kept ok {fmt['kept_success_rate']} "
          f"(all {fmt['success_rate']})")  # fmt: skip
    return report


def _replay(args: argparse.Namespace) -> int:
    from benchmarks.replay_run import main as replay_main

    result: int = replay_main(args.rest)
    return result


def _eval(args: argparse.Namespace) -> int:
    if args.what == "gsm8k":
        from benchmarks.gsm8k_eval import main as gsm8k_main

        result: int = gsm8k_main(args.rest)
        return result
    from benchmarks.bfcl_eval import main as bfcl_main

    result = bfcl_main(args.rest)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slmgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"slmgate {version('slmgate')}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--config", default=None, help="YAML or TOML config file")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="list configured models and routes")
    models.add_argument("--config", default=None)
    models.add_argument(
        "--url", default=None, help="a running gateway: show the state of servers it launched"
    )
    models.set_defaults(func=_models)

    bench = sub.add_parser("bench", help=f"run a benchmark: {', '.join(BENCHMARKS)}")
    bench.add_argument("what", choices=list(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)

    cal = sub.add_parser("calibrate", help="calibrate a route's escalation threshold")
    source = cal.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="JSONL of {signals, success[, features]} rows "
                        "(slmgate eval bfcl --labels)")  # fmt: skip
    source.add_argument("--ledger", help="ledger URL; uses tasks with reported outcomes")
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-fallback-rate", type=float, default=None)
    target.add_argument("--target-success-rate", type=float, default=None)
    cal.add_argument("--signal", default="all", help="one signal, or all (best AUROC first)")
    cal.add_argument("--route", default="auto")
    cal.add_argument("--tier", default="slm", help="tier whose answers are labelled (ledger)")
    cal.add_argument("--window", type=float, default=None, help="ledger window in seconds")
    cal.add_argument("--pre-out", default=None, help="also fit the pre-router; write it here")
    cal.add_argument("--pre-threshold", type=float, default=0.5)
    cal.add_argument("--deferral-out", default=None,
                     help="also fit a learned deferral rule per request kind; write it here")
    cal.add_argument("--holdout", default=None,
                     help="labels the rule was not fitted on: report its AUROC there, next to "
                     "each single signal's (with --deferral-out; the pre-router's with "
                     "--pre-out)")  # fmt: skip
    cal.add_argument("--score-rule", default=None, metavar="PATH|default",
                     help="score an existing deferral rule (a file, or `default`: the bundled "
                     "one) on --holdout, next to each single signal")  # fmt: skip
    cal.add_argument("--json", default=None, help="write the results as JSON")
    cal.set_defaults(func=_calibrate)

    rp = sub.add_parser("replay", help="audit what a route would have done on logged requests",
                        add_help=False)  # fmt: skip
    rp.add_argument("rest", nargs=argparse.REMAINDER)
    rp.set_defaults(func=_replay)

    ev = sub.add_parser("eval", help="evaluate routing policies: bfcl, gsm8k")
    ev.add_argument("what", choices=["bfcl", "gsm8k"])
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    ev.set_defaults(func=_eval)

    from gateway.keys_cli import add_keys_parser

    add_keys_parser(sub)

    args = parser.parse_args(argv)
    if getattr(args, "score_rule", None) and not args.holdout:
        parser.error("calibrate --score-rule needs --holdout FILE")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
