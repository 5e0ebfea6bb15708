"""One typed configuration: a YAML/TOML file plus ``SLMGATE_*`` environment overrides.

With no file at all, slmgate serves the embedded defaults: model ``slm`` (Qwen2.5-Coder-0.5B),
model ``llm`` (Qwen2.5-Coder-1.5B), model ``tiny`` (SmolLM2-135M), route ``auto`` (cascade
SLM → LLM with the learned deferral rule) and route ``pre`` (pre-router). The ledger is a
SQLite file in the cache directory unless ``ledger_url`` (or
``SLMGATE_LEDGER_URL``) names another database, e.g. ``postgresql+psycopg://host/db``. Several
replicas share state through ``redis_url`` (``SLMGATE_REDIS_URL``) and the ledger database.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from decoding.models import DEFAULT_MODELS, ModelSpec
from router.confidence import EarlyFallback
from router.deferral import BUNDLED_RULE_PATH, DeferralRule
from router.memory import MemoryConfig
from router.pre import PreRouter
from router.router import Route
from spec.specreason import SpecReasonConfig

# For requests the learned rule has no model for (free text): the lowest grammar agreement of
# the SLM's tokens, calibrated with `slmgate calibrate --target-success-rate 0.5` on a BFCL split
# (BENCHMARKS.md, "Routing": AUROC 0.73; mean_prob was inverted, 0.24).
DEFAULT_SIGNAL = "min_grammar_agreement"
DEFAULT_THRESHOLD = 0.9986
# The learned deferral rule of the default cascade, fitted by `slmgate calibrate --labels …
# --target-fallback-rate 0.2 --deferral-out` on Qwen2.5-Coder-0.5B's answers: tool calls on BFCL
# items 50-79 of five categories, JSON schemas on BFCL simple_python 200-349 asked as structured
# output (BENCHMARKS.md, "Routing"; held out: items 0-49, 0-149). Free text has no model: a rule
# fitted on GSM8K rests on answer length, which does not carry over to other text. Refit it on
# your own traffic: `slmgate calibrate --ledger URL --deferral-out rule.json`.
DEFAULT_DEFERRAL = DeferralRule.load(BUNDLED_RULE_PATH)
DEFAULT_ROUTES = (
    Route("auto", ("slm", "llm"), policy="cascade", signal=DEFAULT_SIGNAL,
          threshold=DEFAULT_THRESHOLD, deferral=DEFAULT_DEFERRAL),
    Route("pre", ("slm", "llm"), policy="pre"),
    # SpecReason: the small tier writes reasoning steps, the large one scores them.
    Route("reason", ("slm", "llm"), policy="specreason"),
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on the work one request (or one key) can cause; each refusal names its setting."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_queue: int = 64  # requests in flight before 503
    request_timeout_s: float = 600.0  # whole request, queueing included
    max_json_depth: int = 64  # nesting of the body and every JSON value in it
    max_choices: int = 16  # n
    max_generated_tokens: int = 32768  # n x max_tokens
    max_concurrent_per_key: int = 16  # in-flight requests per API key (per client IP when open)
    max_prompt_tokens: int | None = 8192  # per embedded tier; None: the model's context
    grammar_compile_timeout_s: float = 10.0
    grammar_cache_bytes: int = 512 * 1024 * 1024
    max_shadow_pending: int = 16  # shadow answers in flight; more are dropped (policy: shadow)
    max_schema_bytes: int = 256 * 1024  # one response schema or one tool's parameters

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024 or self.max_queue < 1 or self.request_timeout_s <= 0:
            raise ValueError("limits: max_body_bytes >= 1024, max_queue >= 1, timeout > 0")
        if min(self.max_json_depth, self.max_choices, self.max_generated_tokens,
               self.max_concurrent_per_key, self.max_schema_bytes) < 1:  # fmt: skip
            raise ValueError(
                "limits: max_json_depth, max_choices, max_generated_tokens, "
                "max_concurrent_per_key and max_schema_bytes must be >= 1"
            )
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("limits: max_prompt_tokens must be >= 1 (or null for the context)")
        if self.max_shadow_pending < 0:
            raise ValueError("limits: max_shadow_pending >= 0")
        if self.grammar_compile_timeout_s <= 0 or self.grammar_cache_bytes < 1:
            raise ValueError("limits: grammar_compile_timeout_s > 0, grammar_cache_bytes >= 1")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    models: tuple[ModelSpec, ...] = DEFAULT_MODELS
    routes: tuple[Route, ...] = DEFAULT_ROUTES
    api_keys: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    port: int = 8000
    cache_dir: str | None = None
    ledger_url: str | None = None  # None: sqlite file in the cache dir; "off": no ledger
    # Shared by replicas: per-key rate limits and budgets, circuit breakers (None: this process)
    redis_url: str | None = None
    redis_prefix: str = "slmgate"  # namespace of every key slmgate writes to Redis
    # OTLP/HTTP endpoint for OpenTelemetry traces (None: OTEL_EXPORTER_OTLP_* or off)
    otel_endpoint: str | None = None

    def resolved_ledger_url(self) -> str | None:
        """The ledger database URL, or None when the ledger is switched off."""
        if self.ledger_url == "off":
            return None
        if self.ledger_url:
            return self.ledger_url
        from decoding.loader import default_cache_dir

        cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{cache / 'ledger.sqlite3'}"

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        for route in self.routes:
            unknown = [t for t in route.tiers if t not in names]
            if unknown:
                raise ValueError(f"route {route.name!r} names unknown models {unknown}")


def _read_file(path: Path) -> Mapping[str, Any]:
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    return data


def route_from_mapping(data: Mapping[str, Any]) -> Route:
    """One route entry. ``pre`` is a file written by ``slmgate calibrate --pre`` or a mapping
    with ``weights``/``threshold``; ``early_fallback`` takes ``EarlyFallback``'s fields."""
    known = {
        "name", "tiers", "policy", "signal", "threshold", "early_fallback", "pre",
        "speculation", "stream_commit_tokens", "guided_decoding", "deferral", "memory",
        "grammar_engine", "on_invalid", "max_resamples", "abstain_probe", "verify_escalation",
        "specreason",
    }  # fmt: skip
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"route {data.get('name')!r}: unknown keys {sorted(unknown)}")
    nested = {"early_fallback", "pre", "deferral", "memory", "specreason"}
    kwargs: dict[str, Any] = {k: data[k] for k in known & set(data) - nested}
    if "deferral" in data:  # a file, or "default": the rule the default cascade ships with
        deferral = data["deferral"]
        kwargs["deferral"] = (
            DEFAULT_DEFERRAL if deferral == "default" else DeferralRule.load(deferral)
        )
    if "memory" in data:
        kwargs["memory"] = MemoryConfig(**data["memory"])
    if "specreason" in data:
        kwargs["specreason"] = SpecReasonConfig(**data["specreason"])
    kwargs["tiers"] = tuple(data["tiers"])
    if "early_fallback" in data:
        kwargs["early_fallback"] = EarlyFallback(**data["early_fallback"])
    pre = data.get("pre")
    if isinstance(pre, str):
        kwargs["pre"] = PreRouter.load(pre)
    elif isinstance(pre, Mapping):
        base = PreRouter()
        kwargs["pre"] = PreRouter(
            {**base.weights, **pre.get("weights", {})}, float(pre.get("threshold", 0.5))
        )
    return Route(**kwargs)


def routes_for(models: tuple[ModelSpec, ...]) -> tuple[Route, ...]:
    """Routes for a config that lists models but no routes: the default ``auto`` cascade and
    ``pre`` when models ``slm`` and ``llm`` both exist, and ``reason`` when both are embedded
    (SpecReason continues partial answers, which remote tiers cannot); otherwise none beyond the
    model names themselves (each model is a single-tier route to itself)."""
    names = {m.name for m in models}
    embedded = {m.name for m in models if m.kind == "embedded"}
    return tuple(
        r for r in DEFAULT_ROUTES
        if set(r.tiers) <= (embedded if r.policy == "specreason" else names)
    )  # fmt: skip


def from_mapping(data: Mapping[str, Any]) -> GatewayConfig:
    plain = ("host", "port", "cache_dir", "ledger_url", "redis_url", "redis_prefix",
             "otel_endpoint")  # fmt: skip
    known = {"models", "routes", "api_keys", "limits", *plain}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    kwargs: dict[str, Any] = {k: data[k] for k in plain if k in data}
    if "models" in data:
        kwargs["models"] = tuple(ModelSpec.from_mapping(m) for m in data["models"])
    if "routes" in data:
        kwargs["routes"] = tuple(route_from_mapping(r) for r in data["routes"])
    elif "models" in data:
        kwargs["routes"] = routes_for(kwargs["models"])
    if "limits" in data:
        limits = data["limits"] or {}
        unknown = set(limits) - set(Limits.__dataclass_fields__)
        if unknown:
            raise ValueError(f"limits: unknown keys {sorted(unknown)}")
        kwargs["limits"] = Limits(**limits)
    if "api_keys" in data:
        kwargs["api_keys"] = tuple(str(k) for k in data["api_keys"])
    return GatewayConfig(**kwargs)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> (
    GatewayConfig
):
    """Read ``path`` (or ``$SLMGATE_CONFIG``), then apply environment overrides:
    ``SLMGATE_API_KEYS`` (comma-separated), ``SLMGATE_MAX_BODY_BYTES``,
    ``SLMGATE_MAX_QUEUE``, ``SLMGATE_REQUEST_TIMEOUT_S``, ``SLMGATE_CACHE``,
    ``SLMGATE_LEDGER_URL``, ``SLMGATE_REDIS_URL``."""
    env = os.environ if env is None else env
    path = path or env.get("SLMGATE_CONFIG")
    config = from_mapping(_read_file(Path(path))) if path else GatewayConfig()
    if env.get("SLMGATE_API_KEYS"):
        keys = tuple(k.strip() for k in env["SLMGATE_API_KEYS"].split(",") if k.strip())
        config = replace(config, api_keys=keys)
    limits = config.limits
    if "SLMGATE_MAX_BODY_BYTES" in env:
        limits = replace(limits, max_body_bytes=int(env["SLMGATE_MAX_BODY_BYTES"]))
    if "SLMGATE_MAX_QUEUE" in env:
        limits = replace(limits, max_queue=int(env["SLMGATE_MAX_QUEUE"]))
    if "SLMGATE_REQUEST_TIMEOUT_S" in env:
        limits = replace(limits, request_timeout_s=float(env["SLMGATE_REQUEST_TIMEOUT_S"]))
    if env.get("SLMGATE_CACHE"):
        config = replace(config, cache_dir=env["SLMGATE_CACHE"])
    if env.get("SLMGATE_LEDGER_URL"):
        config = replace(config, ledger_url=env["SLMGATE_LEDGER_URL"])
    if env.get("SLMGATE_REDIS_URL"):
        config = replace(config, redis_url=env["SLMGATE_REDIS_URL"])
    return replace(config, limits=limits)
