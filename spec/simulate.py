"""Offline simulator: how much would a drafter speed up greedy decoding of logged requests?

Replays requests in order through a drafter, with no model: the logged output plays the target
model's greedy choices. Each step proposes a draft from the context, accepts its longest path
that matches the next true tokens, adds the one token verification always yields (the "bonus"),
and extends the drafter; a request takes as many steps as verification passes it would need.
``speedup = output tokens / steps`` assumes a verification pass costs what one decoding step
does and drafting is free (the drafter's own time is reported separately).

Usage: ``python -m spec.simulate TRACES [--drafter suffix|stand|both] [--k 16] [--limit N]
[--tree] [--json]``; see :mod:`spec.traces` for the trace formats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from spec.draft import Drafter
from spec.stand import StandDrafter
from spec.suffix import SuffixConfig, SuffixDrafter
from spec.traces import TraceRequest, load_requests

__all__ = ["SimulationResult", "main", "simulate"]


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Totals of one replay; the properties derive the reported rates."""

    drafter: str
    requests: int
    output_tokens: int
    steps: int
    drafted_tokens: int
    accepted_tokens: int  # draft tokens accepted, bonus tokens not included
    propose_us_median: float
    propose_us_p95: float

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per verification step, bonus token included."""
        return self.output_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_length(self) -> float:
        """Draft tokens accepted per step (the bonus token not included)."""
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens (tree nodes included) that were accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def speedup(self) -> float:
        """Decoding steps saved: without drafts every token costs a step."""
        return self.tokens_per_step

    def as_dict(self) -> dict[str, float | int | str]:
        rates = {
            "tokens_per_step": self.tokens_per_step,
            "acceptance_length": self.acceptance_length,
            "acceptance_rate": self.acceptance_rate,
            "speedup": self.speedup,
        }
        return {**asdict(self), **{name: round(value, 4) for name, value in rates.items()}}


def simulate(
    drafter: Drafter, requests: Iterable[TraceRequest], k: int, name: str = "drafter"
) -> SimulationResult:
    """Replay ``requests`` through ``drafter`` with greedy verification of ``k``-token drafts.

    Examples
    --------
    The second request repeats the first one's output. Its first step has nothing to match
    (the prompt ``[1]`` is in neither index) and emits 5; the next matches ``[5]`` in the
    global index and, with ``max_spec_factor=4``, drafts 6 7 8, all accepted: 4 tokens in 2
    steps, after the first request's 4.

    >>> from spec.suffix import SuffixConfig, SuffixDrafter
    >>> same = TraceRequest(prompt_ids=(1,), output_ids=(5, 6, 7, 8))
    >>> result = simulate(SuffixDrafter(SuffixConfig(max_spec_factor=4.0)), [same, same], k=8)
    >>> result.steps, result.accepted_tokens, result.speedup
    (6, 3, 1.3333333333333333)
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    steps = output_tokens = drafted = accepted = count = 0
    timings: list[int] = []
    for req_id, request in enumerate(requests):
        count += 1
        output = request.output_ids
        drafter.start(req_id, request.prompt_ids)
        context = list(request.prompt_ids)
        position = 0
        while position < len(output):
            began = time.perf_counter_ns()
            draft = drafter.propose(req_id, context, k)
            timings.append(time.perf_counter_ns() - began)
            matched = len(draft.accepted_path(output[position : position + len(draft)]))
            emitted = output[position : position + matched + 1]  # + the bonus token
            drafter.extend(req_id, emitted)
            context.extend(emitted)
            position += len(emitted)
            steps += 1
            drafted += len(draft)
            accepted += matched
        output_tokens += len(output)
        drafter.stop(req_id)
    return SimulationResult(
        drafter=name,
        requests=count,
        output_tokens=output_tokens,
        steps=steps,
        drafted_tokens=drafted,
        accepted_tokens=accepted,
        propose_us_median=_percentile_us(timings, 0.5),
        propose_us_p95=_percentile_us(timings, 0.95),
    )


def _percentile_us(timings_ns: list[int], q: float) -> float:
    if not timings_ns:
        return 0.0
    if len(timings_ns) == 1:
        return timings_ns[0] / 1000
    return statistics.quantiles(timings_ns, n=100, method="inclusive")[round(q * 100) - 1] / 1000


def _drafters(choice: str, tree: bool) -> dict[str, Callable[[], Drafter]]:
    suffix_name = "suffix-tree" if tree else "suffix"
    makers: dict[str, Callable[[], Drafter]] = {
        suffix_name: lambda: SuffixDrafter(SuffixConfig(use_tree=tree)),
        "stand": StandDrafter,
    }
    if choice == "both":
        return makers
    return {name: make for name, make in makers.items() if name.startswith(choice)}


def _format(result: SimulationResult) -> str:
    return (
        f"{result.drafter:<12} requests {result.requests:>5}  output tokens "
        f"{result.output_tokens:>7}  steps {result.steps:>7}  tokens/step "
        f"{result.tokens_per_step:5.2f}  accepted/step {result.acceptance_length:5.2f}  "
        f"acceptance rate {result.acceptance_rate:5.1%}  speedup {result.speedup:4.2f}x  "
        f"propose us median {result.propose_us_median:6.1f} p95 {result.propose_us_p95:6.1f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints one line (or one JSON object) per drafter."""
    parser = argparse.ArgumentParser(prog="python -m spec.simulate", description=__doc__)
    parser.add_argument("traces", help="JSONL trace (prompt_ids/output_ids or OpenAI messages)")
    parser.add_argument("--drafter", choices=["suffix", "stand", "both"], default="both")
    parser.add_argument("--k", type=int, default=16, help="most draft tokens per step")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N lines")
    parser.add_argument("--tree", action="store_true", help="suffix drafter drafts trees")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if args.k < 0 or (args.limit is not None and args.limit < 0):
        parser.error("--k and --limit must be >= 0")
    requests = load_requests(args.traces, args.limit)
    results = [
        simulate(make(), requests, args.k, name)
        for name, make in _drafters(args.drafter, args.tree).items()
    ]
    if args.json:
        json.dump([result.as_dict() for result in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for result in results:
            print(_format(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
