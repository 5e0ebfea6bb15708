"""Continuous batching on the real SLM (float32): a request's output does not depend on what else
is in the batch.

The batched engine shares the serial engine's weights; every case runs one at a time through the
serial engine (the reference) and all at once through the batched one: token ids, text, finish
reasons and logprobs must match, for free text, JSON schemas and tool calls, with and without
speculation, with ``n`` seeded choices, under preemption (a pool too small for all of them), and
a cancelled request must give its blocks back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from decoding.batch_engine import BatchConfig
from decoding.engine import EmbeddedEngine, EngineConfig
from decoding.loader import LoadedModel
from decoding.paged import KVPool, SequencePass, run_batch
from decoding.scheduler import SchedulerConfig
from decoding.types import Choice, GenerationRequest, SamplingParams
from decoding.validate import check_output
from schemas.errors import ContextLengthError, GenerationCancelled
from tests.integration.test_engine import user
from tests.integration.test_speculation import CASES, assert_same

pytestmark = pytest.mark.slow


def batched(slm: Any, speculation: str = "none", **batch: Any) -> EmbeddedEngine:
    loaded = LoadedModel(slm.model, slm.tokenizer, "shared with the serial engine")
    config = EngineConfig("batched", speculation=speculation, warmup=False, batching=True,
                          batch=BatchConfig(**batch))  # fmt: skip
    return EmbeddedEngine(loaded, config)


@pytest.fixture(scope="module")
def engines(slm: Any) -> Iterator[dict[str, EmbeddedEngine]]:
    made = {"plain": batched(slm), "suffix": batched(slm, "suffix")}
    yield made
    for engine in made.values():
        engine.close()


def request(case: Any, **params: Any) -> GenerationRequest:
    _, prompt, constraint, tools = case
    sampling = SamplingParams(**({"temperature": 0, "max_tokens": 48, "logprobs": True} | params))
    return GenerationRequest(user(prompt), sampling, constraint, tools, speculation="none")


def all_at_once(engine: EmbeddedEngine, requests: list[GenerationRequest]) -> list[list[Choice]]:
    out: list[list[Choice]] = [[] for _ in requests]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = engine.complete_sync(requests[i]).choices
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return out


def wait_idle(engine: EmbeddedEngine) -> None:
    assert engine.batch is not None
    deadline = time.monotonic() + 60
    while not engine.batch.scheduler.idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.batch.scheduler.idle


def assert_no_blocks_held(engine: EmbeddedEngine) -> None:
    assert engine.batch is not None
    blocks = engine.batch.blocks
    assert all(blocks.refs(b) == 0 for b in range(blocks.num_blocks))
    assert blocks.available == blocks.num_blocks


def test_paged_pass_matches_transformers_and_ignores_its_neighbours(slm: Any) -> None:
    """``run_batch``'s logits for a prompt equal transformers' own forward (float32, 1e-4), and a
    sequence's logits alone and beside another one agree to the same tolerance. Not bit for
    bit: the matrix kernels round differently by how many rows a pass carries (one row takes
    a matrix-vector path), measured ~3e-5 here; attention never reads a neighbour's rows."""
    model = slm.model
    a = slm.tokenizer.encode(
        "The capital of France is Paris. Germany's is", add_special_tokens=False
    )
    b = slm.tokenizer.encode("def add(a, b):\n    return", add_special_tokens=False)
    pool = KVPool(model, 512)
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([a]), cache=DynamicCache()).logits[0].float()
        alone = run_batch(model, pool, [SequencePass(a, 0, torch.arange(len(a)), logits=len(a))])
        both = run_batch(model, pool, [
            SequencePass(b, 0, torch.arange(256, 256 + len(b))),
            SequencePass(a, 0, torch.arange(len(a)), logits=len(a)),
        ])  # fmt: skip
    assert torch.allclose(alone[0], expected, atol=1e-4)
    assert torch.allclose(both[1], alone[0], atol=1e-4)
    assert torch.equal(both[1].argmax(-1), alone[0].argmax(-1))
    assert both[0].shape == (1, expected.shape[-1])


@pytest.mark.parametrize("mode", ["plain", "suffix"])
def test_batch_equals_one_at_a_time(
    slm: Any, engines: dict[str, EmbeddedEngine], mode: str
) -> None:
    """Every case of the speculation suite at once equals each alone on the serial engine
    (greedy ids, text, finish reason, logprobs), and constrained outputs stay valid."""
    requests = [request(case) for case in CASES]
    if mode == "suffix":
        requests = [GenerationRequest(r.messages, r.params, r.constraint, r.tools,
                                      speculation="suffix") for r in requests]  # fmt: skip
    reference = [slm.complete_sync(request(case)).choices[0] for case in CASES]
    together = all_at_once(engines[mode], requests)
    for case, plain, choices in zip(CASES, reference, together, strict=True):
        assert_same(plain, choices[0])
        if choices[0].finish_reason == "stop":
            check_output(case[2], choices[0].text)  # raises on an invalid output
    wait_idle(engines[mode])
    assert_no_blocks_held(engines[mode])


def test_prompt_longer_than_one_pass_is_chunked(
    slm: Any, engines: dict[str, EmbeddedEngine]
) -> None:
    """A prompt over ``max_batch_tokens`` is prefilled in chunks (passes that want no logits),
    alone and beside a short request, with the serial engine's output."""
    story = " ".join(f"Item {i} is a {('red', 'green', 'blue')[i % 3]} box." for i in range(60))
    long = GenerationRequest(user(f"{story}\nWhich colour is item 7?"),
                             SamplingParams(temperature=0, max_tokens=16))  # fmt: skip
    short = GenerationRequest(user("Say hi."), SamplingParams(temperature=0, max_tokens=8))
    engine = engines["plain"]
    assert len(engine.prepare(long).prompt_ids) > 2 * 256
    reference = [slm.complete_sync(r).choices[0].token_ids for r in (long, short)]
    assert engine.complete_sync(long).choices[0].token_ids == reference[0]
    together = all_at_once(engine, [long, short])
    assert [c[0].token_ids for c in together] == reference


def test_seeded_choices_match_serial(slm: Any, engines: dict[str, EmbeddedEngine]) -> None:
    """``n`` sampled choices with a seed: the same texts as the serial engine, and the later
    choices reuse the first one's prompt blocks."""
    req = GenerationRequest(
        user("Tell me a short joke about cats."),
        SamplingParams(temperature=0.9, seed=11, n=3, max_tokens=24),
    )
    serial = [c.text for c in slm.complete_sync(req).choices]
    engine = engines["plain"]
    result = engine.complete_sync(req)
    assert [c.text for c in result.choices] == serial
    assert engine.batch is not None
    assert engine.batch.blocks.stats.hits >= 2


def test_preemption_keeps_outputs(slm: Any) -> None:
    """A pool that cannot hold every sequence at once preempts and recomputes; the outputs are
    still the serial engine's, and every block is given back."""
    engine = batched(slm, kv_cache_tokens=256, block_size=16,
                     scheduler=SchedulerConfig(max_batch_tokens=64, max_running=8))  # fmt: skip
    try:
        prompts = [f"Count from {i} to {i + 30}, separated by commas." for i in range(5)]
        requests = [
            GenerationRequest(user(p), SamplingParams(temperature=0, max_tokens=40))
            for p in prompts
        ]
        reference = [slm.complete_sync(r).choices[0] for r in requests]
        together = all_at_once(engine, requests)
        for plain, choices in zip(reference, together, strict=True):
            assert choices[0].token_ids == plain.token_ids
        assert engine.batch is not None
        assert engine.batch.scheduler.preemptions > 0
        wait_idle(engine)
        assert_no_blocks_held(engine)
    finally:
        engine.close()


def test_cancelled_sequence_frees_its_blocks(engines: dict[str, EmbeddedEngine]) -> None:
    """Closing a stream mid-way cancels its sequence at the next step; its blocks are released
    and the engine goes on serving."""
    engine = engines["plain"]
    long = GenerationRequest(user("Write a long story about a dragon."),
                             SamplingParams(temperature=0, max_tokens=400))  # fmt: skip
    events = engine.generate_sync(long)
    for _ in range(3):
        next(events)
    events.close()  # type: ignore[attr-defined]  # a generator
    wait_idle(engine)
    assert_no_blocks_held(engine)
    short = GenerationRequest(user("Say hi."), SamplingParams(temperature=0, max_tokens=5))
    assert engine.complete_sync(short).choices[0].token_ids


def test_cancel_event_fails_only_its_request(engines: dict[str, EmbeddedEngine]) -> None:
    """A set cancel flag ends that request with ``GenerationCancelled``; a request decoding
    beside it finishes normally."""
    engine = engines["plain"]
    cancel = threading.Event()
    doomed = GenerationRequest(user("Write a long poem."),
                               SamplingParams(temperature=0, max_tokens=300))  # fmt: skip
    other = GenerationRequest(user("Name three colours."),
                              SamplingParams(temperature=0, max_tokens=20))  # fmt: skip
    stream = engine.generate_sync(doomed, cancel)
    next(stream)
    finished: list[Choice] = []
    thread = threading.Thread(target=lambda: finished.extend(engine.complete_sync(other).choices))
    thread.start()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        for _ in stream:
            pass
    thread.join()
    assert finished
    assert finished[0].finish_reason in ("stop", "length")


def test_cancelling_a_request_of_several_choices_keeps_the_loop_serving(
    engines: dict[str, EmbeddedEngine],
) -> None:
    """Cancelling a request with ``n`` = 3 ends all its choices at once (each only once); the
    loop frees their blocks and serves the next request."""
    engine = engines["plain"]
    cancel = threading.Event()
    params = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=300)
    req = GenerationRequest(user("Write a long poem."), params)
    stream = engine.generate_sync(req, cancel)
    next(stream)
    cancel.set()
    with pytest.raises(GenerationCancelled):
        for _ in stream:
            pass
    wait_idle(engine)
    assert_no_blocks_held(engine)
    short = GenerationRequest(user("Say hi."), SamplingParams(temperature=0, max_tokens=5))
    assert engine.complete_sync(short).choices[0].token_ids


def test_a_consumer_that_is_gone_cancels_only_its_request(
    engines: dict[str, EmbeddedEngine],
) -> None:
    """A sink that raises (its event loop closed) cancels that request at the next step; the
    loop keeps serving the others."""
    engine = engines["plain"]
    assert engine.batch is not None

    def gone(_: object) -> None:
        raise RuntimeError("Event loop is closed")

    doomed = GenerationRequest(user("Write a long poem."),
                               SamplingParams(temperature=0, max_tokens=300))  # fmt: skip
    engine.batch.submit(engine.prepare(doomed), threading.Event(), gone)
    wait_idle(engine)
    assert_no_blocks_held(engine)
    short = GenerationRequest(user("Say hi."), SamplingParams(temperature=0, max_tokens=5))
    assert engine.complete_sync(short).choices[0].token_ids


def test_request_larger_than_memory_is_a_400(slm: Any) -> None:
    """A prompt plus max_tokens beyond the key/value memory is refused up front."""
    engine = batched(slm, kv_cache_tokens=64, block_size=16)
    try:
        req = GenerationRequest(user("Say hi."), SamplingParams(temperature=0, max_tokens=60))
        with pytest.raises(ContextLengthError, match="key/value memory"):
            engine.prepare(req)
    finally:
        engine.close()
