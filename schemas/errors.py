"""The one error hierarchy of slmgate; the gateway translates it into OpenAI error bodies.

    SlmgateError                      500 server_error
    ├── InvalidRequestError           400 invalid_request_error
    │   ├── UnsupportedSchemaError    400 invalid_request_error, code "unsupported_schema"
    │   ├── UnsatisfiableSchemaError  400 invalid_request_error, code "unsatisfiable_schema"
    │   ├── SchemaTooComplexError     400 invalid_request_error, code "schema_too_complex"
    │   ├── RequestTooLargeError      400 invalid_request_error, code "request_too_large"
    │   └── ContextLengthError        400 invalid_request_error, code "context_length_exceeded"
    ├── AuthenticationError           401 authentication_error
    ├── PermissionDeniedError         403 permission_error (a key used beyond what it may do)
    ├── NotFoundError                 404 not_found_error, code "model_not_found"
    ├── PayloadTooLargeError          413 invalid_request_error
    ├── UnsupportedMediaTypeError     415 invalid_request_error, code "unsupported_media_type"
    ├── RateLimitError                429 rate_limit_error (retryable)
    │   └── InsufficientQuotaError    429 insufficient_quota (a key's budget is spent)
    ├── OverloadedError               503 overloaded_error (retryable; "circuit_open" when a
    │                                     backend's breaker refuses calls)
    ├── UpstreamError                 502 upstream_error (retryable)
    ├── InvalidOutputError            502 server_error, code "invalid_output" (retryable: every
    │                                     sample the route allowed broke the promised schema)
    ├── RequestTimeoutError           504 timeout (retryable)
    ├── GenerationCancelled           499 cancelled (client went away)
    └── ModelLoadError                500 server_error (weights missing or failing their check)

Each class carries ``status``, an OpenAI ``type`` and ``code``, and ``retryable`` so the router can
tell a caller's mistake (never retried on another tier) from a server-side failure.
"""

from __future__ import annotations


class SlmgateError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retryable: bool = False

    retry_after: float | None = None  # seconds, sent as Retry-After on 429/503

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def to_body(self) -> dict[str, dict[str, str | None]]:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(SlmgateError):
    status = 400
    type = "invalid_request_error"


class UnsupportedSchemaError(InvalidRequestError):
    """A schema no grammar engine here can enforce; the message names the keyword."""

    code = "unsupported_schema"


class UnsatisfiableSchemaError(InvalidRequestError):
    """A schema no JSON value can satisfy, so constrained decoding could never finish."""

    code = "unsatisfiable_schema"


class SchemaTooComplexError(InvalidRequestError):
    """A schema or grammar past a configured bound (compile deadline, size, nesting, forced
    text): refused up front so one request cannot hold a compile thread or memory for long."""

    code = "schema_too_complex"


class RequestTooLargeError(InvalidRequestError):
    """A request past a configured work bound (nesting depth, n x max_tokens, prompt tokens);
    the message names the limit and its ``limits`` setting."""

    code = "request_too_large"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(SlmgateError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(SlmgateError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(SlmgateError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class PayloadTooLargeError(SlmgateError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaTypeError(SlmgateError):
    """A body whose Content-Type is not JSON: refusing it keeps browsers' "simple" cross-site
    requests (text/plain, form posts) from triggering work without a CORS preflight."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimitError(SlmgateError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retryable = True


class InsufficientQuotaError(RateLimitError):
    """OpenAI's "You exceeded your current quota": 429 like a rate limit, but retrying soon
    does not help, so ``Retry-After`` says when the budget's window resets."""

    type = "insufficient_quota"
    code = "insufficient_quota"
    retryable = False


class OverloadedError(SlmgateError):
    status = 503
    type = "overloaded_error"
    code = "overloaded"
    retryable = True


class UpstreamError(SlmgateError):
    status = 502
    type = "upstream_error"
    retryable = True


class InvalidOutputError(SlmgateError):
    """Every output the route tried broke the schema a strict request (or ``on_invalid:
    error``) was promised; the caller gets this instead of an invalid 200."""

    status = 502
    type = "server_error"
    code = "invalid_output"
    retryable = True


class RequestTimeoutError(SlmgateError):
    status = 504
    type = "timeout"
    code = "request_timeout"
    retryable = True


class GenerationCancelled(SlmgateError):
    status = 499
    type = "cancelled"
    code = "client_disconnected"


class ModelLoadError(SlmgateError):
    status = 500
    type = "server_error"
    code = "model_load_failed"
