"""Model specs and the built-in defaults: which weights, dtype and device each model uses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from decoding.engine import EmbeddedEngine, EngineConfig
from decoding.loader import LoadedModel, default_cache_dir, load_gguf_source, load_model_dir
from decoding.weights import QWEN25_CODER_05B, SMOLLM2_135M, GGUFSource

log = logging.getLogger(__name__)

BUILTIN_SOURCES: dict[str, GGUFSource] = {
    "builtin:smollm2-135m-instruct": SMOLLM2_135M,
    "builtin:qwen2.5-coder-0.5b-instruct": QWEN25_CODER_05B,
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One embedded model. ``source`` is a ``builtin:`` name or a local HF model directory.

    ``dtype`` ``auto`` means bfloat16 on CPU (measured ~1.6x faster per decoded token than
    float32 for both default models here) and on CUDA; float32 when exact reproducibility of
    multi-token verification matters (speculation tests pin it).
    """

    name: str
    source: str
    tier: str = "slm"
    dtype: str = "auto"
    device: str = "auto"
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16: {self.dtype!r}")
        if not self.source.startswith("builtin:") and not Path(self.source).exists():
            raise ValueError(f"model source {self.source!r} is neither builtin:… nor a directory")
        if self.source.startswith("builtin:") and self.source not in BUILTIN_SOURCES:
            raise ValueError(
                f"unknown builtin model {self.source!r}; known: {sorted(BUILTIN_SOURCES)}"
            )

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        return "bfloat16" if self.dtype == "auto" else self.dtype


# Default prices ($ per 1M tokens) for the embedded models: what a self-hosted small model of
# this size costs on shared CPU/GPU capacity, set so the LLM tier is ~4x the SLM tier.
DEFAULT_MODELS = (
    ModelSpec("slm", "builtin:smollm2-135m-instruct", tier="slm",
              price_in_per_mtok=0.02, price_out_per_mtok=0.04),
    ModelSpec("llm", "builtin:qwen2.5-coder-0.5b-instruct", tier="llm",
              price_in_per_mtok=0.08, price_out_per_mtok=0.16),
)  # fmt: skip


def load_weights(spec: ModelSpec, cache_dir: Path | None = None) -> LoadedModel:
    device, dtype = spec.resolved_device(), spec.resolved_dtype()
    if spec.source.startswith("builtin:"):
        return load_gguf_source(BUILTIN_SOURCES[spec.source], dtype, device, cache_dir)
    return load_model_dir(Path(spec.source), dtype, device)


def load_engine(spec: ModelSpec, cache_dir: Path | None = None, warmup: bool = True) -> (
    EmbeddedEngine
):
    """Load, warm up and return the engine for ``spec``; logs where the weights came from."""
    loaded = load_weights(spec, cache_dir or default_cache_dir())
    log.info(
        "model %s: %s on %s (%s)", spec.name, loaded.source, spec.resolved_device(),
        spec.resolved_dtype(),
    )  # fmt: skip
    config = EngineConfig(
        name=spec.name,
        tier=spec.tier,
        warmup=warmup,
        price_in_per_mtok=spec.price_in_per_mtok,
        price_out_per_mtok=spec.price_out_per_mtok,
    )
    return EmbeddedEngine(loaded, config)
