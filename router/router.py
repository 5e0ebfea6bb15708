"""Route table and orchestration: which backend answers a request, and what the answer means.

Routes map a public model name to tiers. This first version runs a route's first tier (policy
``single``); SLM-first cascades with uncertainty-aware fallback build on it in the router issue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from decoding.backend import BackendInfo, FinishEvent
from decoding.types import GenerationRequest, GenerationResult, TokenEvent
from decoding.validate import OutputCheck, check_output
from schemas.errors import NotFoundError, OverloadedError


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    tiers: tuple[str, ...]  # backend names, cheapest first
    policy: Literal["single"] = "single"

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError(f"route {self.name!r} needs at least one tier")


@dataclass(slots=True)
class Answer:
    """A finished attempt with everything the gateway renders."""

    result: GenerationResult
    checks: list[OutputCheck]  # one per choice
    backend: BackendInfo
    route: str
    cost_usd: float = 0.0


def attempt_cost(info: BackendInfo, prompt_tokens: int, completion_tokens: int) -> float:
    return (
        prompt_tokens * info.price_in_per_mtok + completion_tokens * info.price_out_per_mtok
    ) / 1e6


class Router:
    def __init__(self, backends: dict[str, Any], routes: dict[str, Route]):
        for route in routes.values():
            missing = [t for t in route.tiers if t not in backends]
            if missing:
                raise ValueError(f"route {route.name!r} names unknown backends {missing}")
        self.backends = backends
        self.routes = routes

    def resolve(self, model: str) -> tuple[Route, Any]:
        """The route for a public model name (a backend name is a route to itself)."""
        route = self.routes.get(model)
        if route is None and model in self.backends:
            route = Route(model, (model,))
        if route is None:
            raise NotFoundError(
                f"The model '{model}' does not exist. Available: "
                f"{', '.join(sorted({*self.routes, *self.backends}))}",
                param="model",
            )
        backend = self.backends[route.tiers[0]]
        if not getattr(backend, "ready", True):
            raise OverloadedError("models are still loading; retry shortly")
        return route, backend

    def prepare(self, backend: Any, req: GenerationRequest) -> Any:
        """Surface request errors (schema, context length) before any byte is sent; the result
        goes back to ``complete``/``stream`` so the backend does not repeat the work."""
        prepare = getattr(backend, "prepare", None)
        return None if prepare is None else prepare(req)

    async def complete(self, model: str, req: GenerationRequest, prepared: Any = None) -> Answer:
        route, backend = self.resolve(model)
        result = await backend.complete(req, prepared)
        checks = [check_output(req.constraint, c.text) for c in result.choices]
        cost = attempt_cost(backend.info, result.prompt_tokens, result.completion_tokens)
        return Answer(result, checks, backend.info, route.name, cost)

    async def stream(
        self, model: str, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        _, backend = self.resolve(model)
        async for event in backend.generate(req, prepared):
            yield event
