"""A tier served by a hosted model (OpenAI, Anthropic, …) through LiteLLM.

LiteLLM is optional (``pip install litellm``) and imported only when such a tier is built. Its
cost map is read from the copy bundled with the package: ``LITELLM_LOCAL_MODEL_COST_MAP=True``
is set before the import unless the environment already decides, so loading never fetches
prices from the network. Prices are $/1M tokens = ``input/output_cost_per_token * 1e6`` from
``litellm.model_cost``; prices in the config override them; a model missing from the map
costs 0 (with a warning) until the config prices it.

Request and response mapping, retries, the circuit breaker and the logprobs fallback are the
OpenAI-compatible backend's (``decoding.openai_compat``); LiteLLM's own retries are off so
they do not multiply with ours. ``drop_params=True`` lets LiteLLM drop what a provider does
not support (e.g. logprobs on Anthropic): the answer then has no confidence signal, and
output that ignores a dropped ``response_format`` fails ``check_output`` like any other.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from decoding.openai_compat import RemoteBackend, RemoteConfig, normalise_base_url
from decoding.openai_wire import error_fields, error_for_status
from decoding.resilience import CircuitBreaker, parse_retry_after
from decoding.types import GenerationRequest
from schemas.errors import ContextLengthError, RequestTimeoutError, SlmgateError, UpstreamError

log = logging.getLogger(__name__)


def import_litellm() -> Any:
    """``litellm``, imported with the bundled cost map (no network at import)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("LiteLLM tiers need litellm: pip install litellm") from exc
    return litellm


def cost_map_prices(model: str) -> tuple[float, float] | None:
    """($ in, $ out) per 1M tokens for ``model`` from LiteLLM's cost map, or None if absent.

    Looks the name up as given, then without its provider prefix (``openai/gpt-4o-mini``)."""
    costs: dict[str, Any] = import_litellm().model_cost
    entry = costs.get(model) or costs.get(model.split("/", 1)[-1])
    if not isinstance(entry, dict):
        return None
    price_in = float(entry.get("input_cost_per_token") or 0.0) * 1e6
    price_out = float(entry.get("output_cost_per_token") or 0.0) * 1e6
    return price_in, price_out


def error_from_litellm(exc: Exception, backend: str) -> SlmgateError | None:
    """The slmgate error for an exception LiteLLM raised (OpenAI-style classes with
    ``status_code``), or None when it is not an API error (a bug: raised as it is)."""
    litellm = import_litellm()
    if isinstance(exc, SlmgateError):
        return exc
    if isinstance(exc, litellm.Timeout | TimeoutError):
        return RequestTimeoutError(f"backend {backend}: upstream timed out: {exc}")
    if isinstance(exc, litellm.ContextWindowExceededError):
        return ContextLengthError(str(getattr(exc, "message", exc)), param="messages")
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        if isinstance(exc, litellm.APIError | litellm.APIConnectionError):
            return UpstreamError(f"backend {backend}: {exc}")
        return None
    message = str(getattr(exc, "message", exc))
    code = param = None
    retry_after = None
    response = getattr(exc, "response", None)
    if isinstance(response, httpx.Response):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        try:
            body = response.json()
        except Exception:  # the response may be synthetic, without a body
            body = None
        message, code, param = error_fields(body, message)
    return error_for_status(
        status, message, backend=backend, retry_after=retry_after, code=code, param=param
    )


class LiteLLMBackend(RemoteBackend):
    """``litellm.acompletion`` behind the ``Backend`` interface.

    ``config.model`` is LiteLLM's model string (``gpt-4o-mini``, ``anthropic/claude-…``, or
    ``openai/<id>`` with ``base_url`` for any OpenAI-compatible server). The key comes from
    ``api_key_env`` when set, else LiteLLM reads its provider's usual variable."""

    def __init__(
        self,
        config: RemoteConfig,
        *,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ):
        self._litellm = import_litellm()
        mapped = cost_map_prices(config.model)
        if mapped is None and config.price_in_per_mtok is None:
            log.warning("model %s (%s) is not in LiteLLM's cost map: priced 0 unless the "
                        "config sets prices", config.name, config.model)  # fmt: skip
        base_in, base_out = mapped or (0.0, 0.0)
        prices = (
            base_in if config.price_in_per_mtok is None else config.price_in_per_mtok,
            base_out if config.price_out_per_mtok is None else config.price_out_per_mtok,
        )
        self.base_url = normalise_base_url(config.base_url) if config.base_url else None
        super().__init__(config, config.model, prices, breaker=breaker, sleep=sleep)
        self._api_key = config.api_key()

    async def _send(
        self, body: dict[str, Any], extras: dict[str, Any], req: GenerationRequest
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.config.model,
            **body,
            "timeout": self.config.timeout_s,
            "num_retries": 0,
            "max_retries": 0,
            "drop_params": True,
        }
        if self.base_url:
            kwargs["api_base"] = self.base_url
        if self._api_key:
            kwargs["api_key"] = self._api_key
        if extras:
            kwargs["extra_body"] = extras
        if req.task_id:
            kwargs["extra_headers"] = {"X-Task-Id": req.task_id}
        try:
            response = await self._litellm.acompletion(**kwargs)
        except Exception as exc:
            mapped = error_from_litellm(exc, self.config.name)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc
        data = response.model_dump(warnings=False) if hasattr(response, "model_dump") else None
        if not isinstance(data, dict):
            raise UpstreamError(f"backend {self.config.name}: unexpected LiteLLM response")
        return data
