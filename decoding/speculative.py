"""Speculative verification: which drafted tokens the target model keeps, without changing output.

The engine forwards ``[pending token] + draft`` in one pass and then walks the rows exactly as
plain decoding would walk steps; this module holds the parts of that walk that are pure
(acceptance rules over probability vectors, tested on toy vocabularies) and the drafters'
engine-side lifecycle (one shared pool per engine, one session per decoded choice).

Lossless sampling. For a deterministic draft token ``d`` and target distribution ``p``,
rejection sampling accepts ``d`` with probability ``p(d)`` and otherwise draws from ``p`` with
``d`` removed, renormalised (:func:`verify_deterministic`); with a stochastic draft drawn from
``q`` it accepts with ``min(1, p(d)/q(d))`` and otherwise draws from ``max(p - q, 0)``
(:func:`verify_stochastic`). The engine's drafts are deterministic, and it uses the coupled form
of the first rule (:func:`coupled_choice`): the target's token at every position is drawn with
noise taken from the request's generator, and the draft token is accepted iff it equals that
token. That accepts with the same probability ``p(d)`` and emits the same residual distribution
on rejection, and the output then depends only on the seed — not on what the drafters (which
learn across requests) happened to propose — so a seeded request stays reproducible.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from decoding.sampling import sampling_probs
from decoding.types import SamplingParams, SpecStats
from spec.draft import Draft, Drafter, merge_drafts
from spec.stand import StandConfig, StandDrafter
from spec.suffix import SuffixConfig, SuffixDrafter

__all__ = [
    "DraftSession",
    "DrafterPool",
    "SpecCounter",
    "best_path",
    "coupled_choice",
    "coupled_sampler",
    "greedy_accept",
    "verify_deterministic",
    "verify_stochastic",
]

# Which drafters each ``speculation`` setting consults.
MODES: dict[str, tuple[str, ...]] = {
    "none": (),
    "suffix": ("suffix",),
    "stand": ("stand",),
    "both": ("suffix", "stand"),
}


# ---- pure acceptance rules --------------------------------------------------------------------


def greedy_accept(draft: Sequence[int], targets: Sequence[int]) -> int:
    """How many leading draft tokens equal the target's own picks at the same positions.

    >>> greedy_accept([5, 6, 7], [5, 6, 9, 1])
    2
    """
    accepted = 0
    for drafted, target in zip(draft, targets, strict=False):
        if drafted != target:
            break
        accepted += 1
    return accepted


def coupled_choice(probs: torch.Tensor, noise: torch.Tensor) -> int:
    """The token an exponential race picks: ``argmax(probs / noise)`` with ``noise ~ Exp(1)``.

    Equivalent to the Gumbel-max trick: the result is distributed exactly as ``probs``, and
    zero-probability tokens never win. Verifying a draft token ``d`` as "accepted iff it is the
    chosen token" accepts with probability ``probs[d]`` and, on rejection, yields a token from
    ``probs`` without ``d``, renormalised: the rejection-sampling rule for deterministic drafts.
    """
    return int(torch.argmax(probs / noise))


def coupled_sampler(
    params: SamplingParams, generator: torch.Generator
) -> Callable[[torch.Tensor], int]:
    """A ``choose`` for :func:`decoding.sampling.pick_token`: one noise vector per position."""

    def choose(masked: torch.Tensor) -> int:
        probs = sampling_probs(masked, params)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        return coupled_choice(probs, noise)

    return choose


def verify_deterministic(
    probs: torch.Tensor, draft_token: int, generator: torch.Generator
) -> tuple[int, bool]:
    """Rejection sampling for a draft token proposed with certainty: ``(token, accepted)``.

    Accept ``draft_token`` with probability ``probs[draft_token]``; otherwise draw from
    ``probs`` with that token removed and renormalised. The emitted token is distributed
    exactly as ``probs``.
    """
    p_draft = float(probs[draft_token])
    if float(torch.rand((), generator=generator)) < p_draft:
        return draft_token, True
    residual = probs.clone()
    residual[draft_token] = 0.0
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator)), False


def verify_stochastic(
    p: torch.Tensor, q: torch.Tensor, draft_token: int, generator: torch.Generator
) -> tuple[int, bool]:
    """Rejection sampling for a draft token drawn from ``q`` (e.g. STAND's sampled tree).

    Accept with probability ``min(1, p[d] / q[d])``; otherwise draw from ``max(p - q, 0)``
    renormalised (Leviathan et al. 2023). The emitted token is distributed exactly as ``p``.

    Raises
    ------
    ValueError
        If ``q`` gives the drafted token no probability (it could not have been drawn).
    """
    q_draft = float(q[draft_token])
    if q_draft <= 0.0:
        raise ValueError(f"draft token {draft_token} has probability 0 under q")
    ratio = min(1.0, float(p[draft_token]) / q_draft)
    if float(torch.rand((), generator=generator)) < ratio:
        return draft_token, True
    residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    if float(total) <= 0.0:  # p == q: rejection has probability 0; guard float round-off
        residual, total = p, p.sum()
    return int(torch.multinomial(residual / total, 1, generator=generator)), False


def best_path(draft: Draft) -> tuple[list[int], float]:
    """The root path of ``draft`` with the most expected accepted tokens, and that expectation.

    A node's score is its estimated acceptance probability, so a path's expected accepted
    length is the sum of its scores; the engine verifies one path per pass.

    >>> best_path(Draft((5, 6, 7), (-1, -1, 1), (0.6, 0.4, 0.35)))
    ([6, 7], 0.75)
    """
    if not draft.token_ids:
        return [], 0.0
    if draft.is_path():
        return list(draft.token_ids), draft.total_score
    value: list[float] = []
    for parent, score in zip(draft.parents, draft.scores, strict=True):
        value.append(score + (value[parent] if parent >= 0 else 0.0))
    node = max(range(len(value)), key=lambda i: (value[i], -i))
    path: list[int] = []
    while node >= 0:
        path.append(draft.token_ids[node])
        node = draft.parents[node]
    return path[::-1], max(value)


def _path_draft(draft: Draft, path: Sequence[int]) -> Draft:
    """``path`` (a root path of ``draft``) as a chain draft carrying its nodes' scores."""
    scores: list[float] = []
    node = -1
    for token in path:
        node = next(
            i
            for i in range(node + 1, len(draft))
            if draft.parents[i] == node and draft.token_ids[i] == token
        )
        scores.append(draft.scores[node])
    return Draft.path(path, scores)


# ---- statistics ---------------------------------------------------------------------------------


@dataclass(slots=True)
class SpecCounter:
    """Mutable counts behind :class:`SpecStats` for one choice.

    A step is one forward pass that emitted at least one token; its length is every token it
    appended to the output (accepted drafts, the model's own token, forced grammar text), so
    the histogram's total length equals the number of output tokens. A last pass that only
    produced the end-of-turn token emits nothing and is not a step.
    """

    drafter: str
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    lengths: dict[int, int] = field(default_factory=dict)

    def record(self, drafted: int, accepted: int, emitted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if emitted:
            self.lengths[emitted] = self.lengths.get(emitted, 0) + 1

    def stats(self) -> SpecStats:
        longest = max(self.lengths, default=0)
        histogram = tuple(self.lengths.get(i + 1, 0) for i in range(longest))
        return SpecStats(
            self.drafter,
            self.drafted,
            self.accepted,
            sum(histogram),
            histogram,
            draft_us=self.draft_seconds * 1e6,
        )


# ---- drafters on the engine -------------------------------------------------------------------


class DrafterPool:
    """The engine's drafters, shared by all requests so they learn from past outputs.

    ``suffix`` (SuffixDecoding: prompt + global index over recent outputs) and ``stand``
    (STAND n-gram distributions) are built in; ``add`` registers another drafter under a name
    (the benchmark's reference drafter). Calls are serialised by one lock, since the gateway's
    worker thread and direct ``generate_sync`` callers may decode at the same time.
    """

    def __init__(
        self, suffix: SuffixConfig | None = None, stand: StandConfig | None = None
    ) -> None:
        self.drafters: dict[str, Drafter] = {
            "suffix": SuffixDrafter(suffix),
            "stand": StandDrafter(stand),
        }
        self.lock = threading.Lock()
        self._ids = itertools.count()
        # called (on the decoding thread) with each finished output's tokens; gateway.learned_sync
        # publishes them so other replicas' drafters learn from this one's traffic
        self.on_learned: Callable[[list[int]], None] | None = None

    def learn(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        """Learn from an output produced elsewhere (another replica), as if it had been decoded
        here: a whole start/extend/stop lifecycle on every drafter."""
        req_id = ("learned", next(self._ids))
        with self.lock:
            for drafter in self.drafters.values():
                drafter.start(req_id, prompt_ids)
                drafter.extend(req_id, output_ids)
                drafter.stop(req_id)

    def add(self, name: str, drafter: Drafter) -> None:
        """Register ``drafter``; a request's ``speculation`` may then name it."""
        self.drafters[name] = drafter

    def names(self, mode: str) -> tuple[str, ...]:
        """The drafters a ``speculation`` value consults.

        Raises
        ------
        ValueError
            For a value that is neither a mode nor a registered drafter.
        """
        if mode in MODES:
            return MODES[mode]
        if mode in self.drafters:
            return (mode,)
        raise ValueError(f"unknown speculation mode {mode!r}")

    def session(self, mode: str, prompt_ids: Sequence[int]) -> DraftSession | None:
        """Start one choice's drafting (``None`` when ``mode`` drafts nothing)."""
        names = self.names(mode)
        if not names:
            return None
        return DraftSession(self, names, ("choice", next(self._ids)), prompt_ids, mode)


class DraftSession:
    """One choice's view of the pool: the ``start/extend/propose/stop`` lifecycle, timed."""

    def __init__(
        self,
        pool: DrafterPool,
        names: tuple[str, ...],
        req_id: Hashable,
        prompt_ids: Sequence[int],
        label: str,
    ) -> None:
        self.pool = pool
        self.req_id = req_id
        self.counter = SpecCounter(label)
        self._output: list[int] = []
        self._drafters = [pool.drafters[name] for name in names]
        self._stand = [d for d in self._drafters if isinstance(d, StandDrafter)]
        self._stand_k = max((d.config.max_stored for d in self._stand), default=0)
        with pool.lock:
            for drafter in self._drafters:
                drafter.start(req_id, prompt_ids)

    @property
    def observes(self) -> bool:
        """Whether a drafter wants the target's distributions seen during verification."""
        return bool(self._stand)

    def propose(self, context: Sequence[int], limit: int, tree: bool = True) -> Draft:
        """A draft of at most ``limit`` nodes after ``context``.

        With ``tree`` every drafter's tree is merged and cut to the ``limit`` nodes most likely
        to be accepted (one pass verifies them all); without it, the single root path with the
        most expected accepted tokens over all drafters (ties: the longer path)."""
        if limit <= 0:
            return Draft.empty()
        started = time.perf_counter()
        with self.pool.lock:
            drafts = [d.propose(self.req_id, context, limit) for d in self._drafters]
        if tree:
            draft = merge_drafts(drafts, limit)
        else:
            draft = Draft.empty()
            best = (0.0, 0)
            for candidate in drafts:
                path, value = best_path(candidate)
                if (value, len(path[:limit])) > best:
                    best = (value, len(path[:limit]))
                    draft = _path_draft(candidate, path[:limit])
        self.counter.draft_seconds += time.perf_counter() - started
        return draft

    def extend(self, tokens: Sequence[int]) -> None:
        if tokens:
            if self.pool.on_learned is not None:
                self._output.extend(tokens)
            with self.pool.lock:
                for drafter in self._drafters:
                    drafter.extend(self.req_id, tokens)

    def observe(self, context: Sequence[int], logits: torch.Tensor) -> None:
        """Hand STAND the target's top-k next-token probabilities after ``context``."""
        values, ids = torch.topk(logits, self._stand_k)
        probs = (values - torch.logsumexp(logits, -1)).exp()
        with self.pool.lock:
            for drafter in self._stand:
                drafter.observe(self.req_id, context, ids.tolist(), probs.tolist())

    def close(self) -> None:
        """End the request: the drafters learn from its output for later requests."""
        with self.pool.lock:
            for drafter in self._drafters:
                drafter.stop(self.req_id)
        if self.pool.on_learned is not None and self._output:
            try:
                self.pool.on_learned(self._output)
            except Exception:  # sharing is best effort; decoding never fails for it
                logging.getLogger(__name__).exception("publishing a learned output failed")
