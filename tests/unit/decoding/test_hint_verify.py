"""Verified escalation's sampling case on a toy vocabulary: with a draft hint, a choice's output
is distributed exactly as without one (the hint changes how many passes it takes, not what is
drawn), and greedy output is the argmax path whatever the hint says.

The "model" is a Markov chain over four tokens (``a``, ``b``, ``c`` and an end token); the
decoder is the engine's own ``ChoiceDecoder``, fed the rows a forward pass would produce.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from decoding.choice import ChoiceDecoder
from decoding.speculative import DrafterPool
from decoding.types import GenerationRequest, SamplingParams
from spec.draft import Draft
from spec.hint import HintConfig

VOCAB = "abc"
EOS = 3
# P(next | last): rows a, b, c, and the start (the prompt's last token is "a")
CHAIN = torch.tensor([
    [0.2, 0.5, 0.2, 0.1],
    [0.3, 0.1, 0.4, 0.2],
    [0.5, 0.2, 0.1, 0.2],
])  # fmt: skip
MAX_TOKENS = 3


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [VOCAB.index(ch) for ch in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(VOCAB[i] for i in ids if i != EOS)


class ToyHost:
    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()
        self.stop_ids = [EOS]
        self.drafters = DrafterPool()

    @property
    def jump_forward_enabled(self) -> bool:
        return False

    @property
    def spec_tree(self) -> bool:
        return True

    @property
    def hint_config(self) -> HintConfig:
        return HintConfig(first_chunk=2, max_chunk=4)

    def new_grammar_state(self, compiled: Any) -> Any:
        raise AssertionError("no grammar here")

    def token_text(self, token_id: int) -> str:
        return VOCAB[token_id] if token_id != EOS else ""

    def speculation_for(self, request: GenerationRequest) -> str:
        return "none"


def rows_for(context: list[int], draft: Draft) -> torch.Tensor:
    """What a pass yields: the next-token logits after the context, then after each draft node
    (drafts here are chains)."""
    path = list(context)
    rows = [CHAIN[path[-1]].log()]
    for token in draft.token_ids:
        path.append(token)
        rows.append(CHAIN[token].log() if token != EOS else torch.zeros(4))
    return torch.stack(rows)


def decode(hint: str, params: SamplingParams) -> tuple[str, int]:
    """(output text, passes) of one choice decoded with ``hint`` as its draft hint."""
    req = GenerationRequest(({"role": "user", "content": "x"},), params, draft_hint=hint)
    decoder = ChoiceDecoder(ToyHost(), req, [0], None, MAX_TOKENS, 0)
    text, passes = "", 0
    while True:
        draft = decoder.draft(max(16, decoder.wants_draft))
        step = decoder.walk(rows_for(decoder.context, draft), draft)
        passes += 1
        text += "".join(e.text for e in step.events)
        if step.finished:
            return text, passes


def exact_distribution() -> dict[str, float]:
    """P(output) of the chain from "a", ending at the end token or after MAX_TOKENS tokens."""
    out: dict[str, float] = {}
    for length in range(MAX_TOKENS + 1):
        for seq in itertools.product(range(4), repeat=length):
            if EOS in seq[:-1]:
                continue
            last, p = 0, 1.0
            for token in seq:
                p *= float(CHAIN[last][token])
                last = token
            ended = bool(seq) and seq[-1] == EOS
            if not ended and length < MAX_TOKENS:
                continue
            text = "".join(VOCAB[t] for t in seq if t != EOS)
            out[text] = out.get(text, 0.0) + p
    return out


@pytest.mark.parametrize("hint", ["", "bca", "bcab", "cc"])
def test_sampled_output_is_distributed_as_the_model_whatever_the_hint(hint: str) -> None:
    n = 6000
    counts = Counter(
        decode(hint, SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS))[0]
        for seed in range(n)
    )
    exact = exact_distribution()
    assert set(counts) <= set(exact)
    chi = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in exact.items())
    # Pearson at p = 0.001: df = len(exact) - 1 (~40 here); critical ~ df + 3.1 * sqrt(2 df)
    df = len(exact) - 1
    assert chi < df + 3.1 * math.sqrt(2 * df)


def test_greedy_output_ignores_the_hint_and_a_right_hint_saves_passes() -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    plain, plain_passes = decode("", greedy)
    assert plain == "bca"  # the argmax path from "a": b (0.5), c (0.4), a (0.5)
    assert plain_passes == MAX_TOKENS
    right, right_passes = decode("bca", greedy)
    wrong, _ = decode("cab", greedy)
    assert right == wrong == plain
    assert right_passes == 1  # the hint's tokens were all accepted in one pass


def test_hint_stats_count_what_was_offered_and_kept() -> None:
    req = GenerationRequest(({"role": "user", "content": "x"},),
                            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                            draft_hint="bcc")  # fmt: skip
    decoder = ChoiceDecoder(ToyHost(), req, [0], None, MAX_TOKENS, 0)
    finish = None
    while finish is None:
        draft = decoder.draft(16)
        step = decoder.walk(rows_for(decoder.context, draft), draft)
        finish = step.events[-1] if step.finished else None
    hint = getattr(finish, "hint", None)
    assert hint is not None
    # first pass: "bc" offered (room: 2 of the 3 tokens), both kept; then "a" is the model's,
    # and the output has left the hint ("bca" vs "bcc")
    assert (hint.drafted, hint.reused, hint.passes) == (2, 2, 1)
