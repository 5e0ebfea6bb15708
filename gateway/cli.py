"""The ``slmgate`` command: serve, models, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.config import load_config

    config = load_config(args.config)
    host = args.host or config.host
    port = args.port or config.port
    for m in config.models:
        logging.getLogger("slmgate").info(
            "model %s (%s tier): %s, dtype %s, device %s", m.name, m.tier, m.source,
            m.resolved_dtype(), m.resolved_device(),
        )  # fmt: skip
    uvicorn.run(create_app(config), host=host, port=port, log_level=args.log_level)
    return 0


def _models(args: argparse.Namespace) -> int:
    from decoding.loader import default_cache_dir
    from decoding.models import BUILTIN_SOURCES
    from gateway.config import load_config

    config = load_config(args.config)
    cache = default_cache_dir() if config.cache_dir is None else Path(config.cache_dir)
    for m in config.models:
        source = BUILTIN_SOURCES.get(m.source)
        cached = source is not None and (cache / "models" / source.sha256 / "config.json").exists()
        state = "converted in cache" if cached else "not converted yet (first load ~30-70 s)"
        if source is None:
            state = "local directory"
        print(f"{m.name:8s} tier={m.tier:4s} {m.source}  dtype={m.resolved_dtype()} "
              f"device={m.resolved_device()}  [{state}]")  # fmt: skip
    for r in config.routes:
        print(f"route {r.name}: {' -> '.join(r.tiers)} ({r.policy})")
    return 0


BENCHMARKS = {
    "grammar": "benchmarks.grammar_bench",
    "gateway": "benchmarks.gateway_bench",
    "spec": "benchmarks.spec_bench",
    "ledger": "benchmarks.ledger_bench",
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.what])
    result: int = module.main(args.rest)
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
    models.set_defaults(func=_models)

    bench = sub.add_parser("bench", help=f"run a benchmark: {', '.join(BENCHMARKS)}")
    bench.add_argument("what", choices=list(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
