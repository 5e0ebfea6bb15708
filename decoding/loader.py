"""Load a causal LM and its tokenizer: from a GGUF (converted once into a local cache) or a
Hugging Face model directory.

Dequantising a GGUF with transformers takes 15–30 s on the project machines, so the first load
saves the dequantised weights (safetensors), tokenizer and chat template under
``<cache>/<gguf sha256>/`` and later loads read that directory (a few seconds).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decoding.weights import GGUFSource, assemble_gguf
from schemas.errors import ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    """``$SLMGATE_CACHE`` or ``~/.cache/slmgate``."""
    env = os.environ.get("SLMGATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "slmgate"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    source: str  # where the weights were read from, for startup logs


def _from_dir(path: Path, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    from decoding.attention import ATTENTION

    model: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=ATTENTION
    )
    model = model.to(device)
    model.eval()
    return model, tokenizer


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` and save it as a plain HF model directory at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (one-time, ~30-90 s) into %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse; the
    # tensors are already plain float32 after dequantisation, so the marker can go.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def load_gguf_source(
    source: GGUFSource, dtype: str, device: str, cache_dir: Path | None = None
) -> LoadedModel:
    """Load a packaged GGUF model, converting it into the cache on first use."""
    gguf, converted = converted_dir(source, cache_dir)
    model, tokenizer = _from_dir(converted, _dtype(dtype), device)
    return LoadedModel(model, tokenizer, f"{gguf} (cached as {converted})")


def converted_dir(source: GGUFSource, cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(the assembled GGUF, its Hugging Face directory in the cache), converting it on first
    use: the directory a vLLM server launched for a built-in model is given."""
    cache = cache_dir or default_cache_dir()
    gguf = assemble_gguf(source, cache / "gguf")
    converted = cache / "models" / source.sha256
    if not (converted / "config.json").is_file():
        convert_gguf(gguf, converted)
    return gguf, converted


def load_model_dir(path: Path, dtype: str, device: str) -> LoadedModel:
    """Load any local Hugging Face model directory (config.json, weights, tokenizer)."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
    model, tokenizer = _from_dir(path, _dtype(dtype), device)
    return LoadedModel(model, tokenizer, str(path))


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None
