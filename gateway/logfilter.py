"""Keep secrets that arrive in URLs out of the logs.

The gateway never reads a key from a URL, but a client (or an old dashboard link) may still send
``?key=…``, and uvicorn's access log writes the whole request line. ``redact_query_secrets`` is a
``logging.Filter`` that rewrites every ``key``/``api_key``/``token`` (and ``apikey``,
``access_token``) query value in a record's message and arguments to ``***``.
``uvicorn_log_config()`` is uvicorn's own logging config with that filter on its access handler:
``uvicorn.run(app, log_config=uvicorn_log_config())``.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from typing import Any

from uvicorn.config import LOGGING_CONFIG

MASK = "***"
# a parameter name after ? or & (case-insensitive), its value up to the next separator
_SECRET = re.compile(
    r"(?P<name>[?&](?:api[_-]?key|key|access[_-]?token|token)=)[^&#\s\"']*", re.IGNORECASE
)


def redact_url_secrets(text: str) -> str:
    """``text`` with every secret query value replaced by ``***``."""
    return _SECRET.sub(lambda m: m.group("name") + MASK, text)


def _redact(value: Any) -> Any:
    return redact_url_secrets(value) if isinstance(value, str) else value


class RedactQuerySecrets(logging.Filter):
    """Rewrites secret query values in a record (uvicorn's access log passes the path with its
    query as an argument); never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_url_secrets(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {k: _redact(v) for k, v in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(_redact(v) for v in record.args)
        return True


#: The filter to install: ``logging.getLogger("uvicorn.access").addFilter(redact_query_secrets)``.
redact_query_secrets = RedactQuerySecrets()


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging config, its access handler filtered by ``RedactQuerySecrets``."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_query_secrets"] = {
        "()": "gateway.logfilter.RedactQuerySecrets"
    }
    config["handlers"]["access"]["filters"] = ["redact_query_secrets"]
    return config
