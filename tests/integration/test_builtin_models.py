"""The built-in Qwen2.5-Coder-1.5B-Instruct loads from its 22 data packages (sha256-checked,
converted once into the cache) and answers through the embedded engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from decoding.engine import EmbeddedEngine
from decoding.loader import default_cache_dir
from decoding.models import ModelSpec, load_engine
from decoding.types import GenerationRequest, SamplingParams
from decoding.weights import QWEN25_CODER_15B

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm15() -> Iterator[EmbeddedEngine]:
    engine = load_engine(ModelSpec("llm15", "builtin:qwen2.5-coder-1.5b-instruct", tier="llm"))
    yield engine
    engine.close()


def test_15b_loads_from_its_pinned_weights(llm15: EmbeddedEngine) -> None:
    info = llm15.info
    assert (info.name, info.tier, info.model) == ("llm15", "llm", "qwen2.5-coder-1.5b-instruct")
    assert info.dtype == "bfloat16"
    assert info.context_length == 32768
    config = llm15.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (28, 1536)
    cache = default_cache_dir()
    assert (cache / "gguf" / f"{QWEN25_CODER_15B.name}.verified").is_file()
    assert (cache / "models" / QWEN25_CODER_15B.sha256 / "config.json").is_file()


def test_15b_answers_a_greedy_prompt(llm15: EmbeddedEngine) -> None:
    req = GenerationRequest(
        ({"role": "user", "content": "What is 7 times 6? Reply with the number only."},),
        SamplingParams(temperature=0, max_tokens=8),
    )
    result = llm15.complete_sync(req)
    assert result.model == "llm15"  # the configured name clients address; weights are in info
    assert result.choices[0].text.strip() == "42"
    assert result.choices[0].finish_reason == "stop"
