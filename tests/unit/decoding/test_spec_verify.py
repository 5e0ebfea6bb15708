"""Speculative verification rules on toy vocabularies: the emitted distribution is the target's."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from decoding.sampling import pick_token, sampling_probs
from decoding.speculative import (
    DrafterPool,
    SpecCounter,
    best_path,
    coupled_choice,
    coupled_sampler,
    greedy_accept,
    verify_deterministic,
    verify_stochastic,
)
from decoding.types import SamplingParams
from spec.draft import Draft

N = 10_000
TARGET = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1, 0.0])


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's test at p = 0.001 over the support (critical values for df 1..5)."""
    support = probs > 0
    expected = probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[int(support.sum()) - 1]
    return stat < critical and float(counts[~support].sum()) == 0


def histogram(draw: Callable[[torch.Generator], int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(TARGET))
    for _ in range(N):
        counts[draw(gen)] += 1
    return counts


@pytest.mark.parametrize("draft_token", [0, 1, 4, 5])
def test_deterministic_rejection_sampling_reproduces_the_target(draft_token: int) -> None:
    accepted = 0

    def draw(gen: torch.Generator) -> int:
        nonlocal accepted
        token, ok = verify_deterministic(TARGET, draft_token, gen)
        accepted += ok
        return token

    counts = histogram(draw, seed=1)
    assert chi_square_ok(counts, TARGET)
    assert total_variation(counts, TARGET) < 0.02
    assert abs(accepted / N - float(TARGET[draft_token])) < 0.015  # accepts with p(d)


@pytest.mark.parametrize("seed", [2, 3])
def test_stochastic_rejection_sampling_reproduces_the_target(seed: int) -> None:
    q = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1])  # the draft distribution (STAND, sampled)
    accepted = 0

    def draw(gen: torch.Generator) -> int:
        nonlocal accepted
        d = int(torch.multinomial(q, 1, generator=gen))
        token, ok = verify_stochastic(TARGET, q, d, gen)
        accepted += ok
        return token

    counts = histogram(draw, seed)
    assert chi_square_ok(counts, TARGET)
    overlap = float(torch.minimum(TARGET, q).sum())  # acceptance rate of the min(1, p/q) rule
    assert abs(accepted / N - overlap) < 0.015


def test_stochastic_rule_refuses_a_token_q_cannot_draw() -> None:
    with pytest.raises(ValueError, match="probability 0"):
        verify_stochastic(TARGET, torch.tensor([1.0, 0, 0, 0, 0, 0]), 2, torch.Generator())


@pytest.mark.parametrize("draft_token", [1, 3])
def test_coupled_choice_is_rejection_sampling_for_deterministic_drafts(draft_token: int) -> None:
    """The engine's form: the target draws with its own noise; the draft is kept iff equal."""

    def draw(gen: torch.Generator) -> int:
        return coupled_choice(TARGET, torch.empty(len(TARGET)).exponential_(generator=gen))

    counts = histogram(draw, seed=4)
    assert chi_square_ok(counts, TARGET)
    assert abs(float(counts[draft_token]) / N - float(TARGET[draft_token])) < 0.015
    rejected = counts.clone()
    rejected[draft_token] = 0
    residual = TARGET.clone()
    residual[draft_token] = 0
    assert chi_square_ok(rejected, residual / residual.sum())  # p without d, renormalised


def test_coupled_sampler_applies_the_plain_sampling_transform() -> None:
    """Temperature, top-k and top-p as plain sampling: same distribution, through pick_token."""
    logits = torch.log(torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1, 1e-9]))
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=4)
    probs = sampling_probs(logits, params)
    gen = torch.Generator().manual_seed(5)
    choose = coupled_sampler(params, gen)
    counts = torch.zeros(6)
    for _ in range(N):
        counts[pick_token(logits, None, params, None, choose=choose).token_id] += 1
    assert chi_square_ok(counts, probs)
    assert float(counts[4]) == 0
    assert float(counts[5]) == 0


def test_coupled_sampler_is_reproducible_per_seed() -> None:
    params = SamplingParams(temperature=1.0)
    logits = torch.log(TARGET + 1e-3)

    def run(seed: int) -> list[int]:
        choose = coupled_sampler(params, torch.Generator().manual_seed(seed))
        return [choose(logits) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_greedy_accept_is_the_matching_prefix() -> None:
    assert greedy_accept([3, 4, 5], [3, 4, 5, 6]) == 3
    assert greedy_accept([3, 4, 5], [3, 9, 5]) == 1
    assert greedy_accept([], [1]) == 0
    assert greedy_accept([2], [1]) == 0


def test_best_path_follows_the_most_expected_tokens() -> None:
    assert best_path(Draft.empty()) == ([], 0.0)
    path, value = best_path(Draft.path([1, 2], [0.9, 0.5]))
    assert (path, round(value, 6)) == ([1, 2], 1.4)
    path, value = best_path(Draft((5, 6, 7, 8), (-1, -1, 0, 2), (0.5, 0.45, 0.3, 0.2)))
    assert (path, round(value, 6)) == ([5, 7, 8], 1.0)


def test_counter_histogram_adds_up() -> None:
    counter = SpecCounter("suffix")
    counter.record(drafted=4, accepted=2, emitted=3)
    counter.record(drafted=0, accepted=0, emitted=1)
    counter.record(drafted=3, accepted=0, emitted=0)  # only the end-of-turn token
    stats = counter.stats()
    assert (stats.drafted, stats.accepted, stats.steps, stats.histogram) == (7, 2, 2, (1, 0, 1))
    assert math.isclose(stats.mean_accepted_length, 2.0)


def test_pool_sessions_share_what_past_outputs_taught() -> None:
    pool = DrafterPool()
    first = pool.session("suffix", [1, 2, 3])
    assert first is not None
    first.extend([10, 11, 12, 13, 14, 15, 16])
    first.close()
    context = [7, 10, 11, 12]  # a 3-token match allows 3 tokens (max_spec_factor 1)
    second = pool.session("suffix", context)
    assert second is not None
    assert second.propose(context, 8).token_ids == (13, 14, 15)  # from the global index
    assert second.propose(context, 2).token_ids == (13, 14)
    assert second.propose(context, 2, tree=False).path_tokens() == (13, 14)
    second.close()
    assert pool.session("none", [1]) is None
    with pytest.raises(ValueError, match="unknown speculation"):
        pool.session("nonsense", [1])


def test_stand_session_observes_target_distributions() -> None:
    pool = DrafterPool()
    session = pool.session("stand", [1, 2])
    assert session is not None
    assert session.observes
    logits = torch.full((20,), -10.0)
    logits[7] = 5.0
    session.observe([1, 2], logits)
    tree = session.propose([1, 2], 4)
    assert tree.token_ids[0] == 7
    assert tree.parents[0] == -1
    assert session.propose([1, 2], 4, tree=False).token_ids[:1] == (7,)
    session.close()
