"""Shared fixtures. Models load lazily, once per session, never at collection time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slm() -> Iterator[object]:
    """The default SLM (SmolLM2-135M) in float32, so comparisons are exact, on the serial
    engine (one request at a time): the reference the batched engine is compared with."""
    from decoding.models import ModelSpec, load_engine

    spec = ModelSpec("slm", "builtin:smollm2-135m-instruct", dtype="float32", batching=False)
    engine = load_engine(spec)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def llm() -> Iterator[object]:
    """The default LLM tier (Qwen2.5-Coder-0.5B) in bfloat16, as served (batched)."""
    from decoding.models import ModelSpec, load_engine

    engine = load_engine(ModelSpec("llm", "builtin:qwen2.5-coder-0.5b-instruct"))
    yield engine
    engine.close()
