"""BFCL items, their OpenAI tools, and BFCL's own verdict on a model's tool calls.

Everything BFCL-specific lives here, as pure functions over plain data, so the evaluation loop
(``benchmarks.bfcl_eval``) only sends requests and counts. The data, the type mapping
(``GORILLA_TO_OPENAPI`` through BFCL's ``convert_to_tool`` in OpenAI-completions style, which also
turns dots in function names into underscores) and the AST checker are BFCL's, imported from the
installed ``bfcl-eval`` package (``requirements-eval.txt``), so scores match the leaderboard's
function-calling (FC) mode.

BFCL's checker module imports ``bfcl_eval.constants.model_config``, which imports every
provider SDK; a stub module takes its place before the first import. The checker is told that
our model does not turn underscores back into dots: names are mapped back here instead.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import types
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from schemas.jsonschema_utils import validation_errors

CHECKER_MODEL = "slmgate"  # the model name BFCL's checker sees (no "_": it reads those as "/")
DEFAULT_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
SUPPORTED_CATEGORIES = (
    *DEFAULT_CATEGORIES,
    "simple_java",
    "simple_javascript",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "live_irrelevance",
    "live_relevance",
)
ALIASES = {"simple": "simple_python"}  # the name before BFCL v4

Call = tuple[str, str]  # (function name as the model wrote it, arguments as JSON text)


@dataclass(frozen=True, slots=True)
class BfclItem:
    """One single-turn BFCL entry: what is sent, and what the checker compares against."""

    id: str
    category: str
    messages: list[dict[str, Any]]  # the first (only) turn
    functions: list[dict[str, Any]]  # BFCL's docs as its generation step sends them (with hint)
    checker_functions: list[dict[str, Any]]  # the same docs as its checker reads them (no hint)
    ground_truth: list[dict[str, Any]] | None  # None for (ir)relevance categories


@dataclass(frozen=True, slots=True)
class Verdict:
    """BFCL's verdict on one item; ``error_type`` is BFCL's own (e.g. ``value_error:string``)."""

    success: bool
    error_type: str | None = None
    errors: tuple[str, ...] = ()


@cache
def bfcl() -> types.SimpleNamespace:
    """BFCL's modules, imported once with ``model_config`` stubbed out.

    BFCL creates ``result/``, ``score/`` and a lock folder under ``BFCL_PROJECT_ROOT`` (default:
    site-packages) at import; they go to a temporary folder unless the caller chose one.
    """
    os.environ.setdefault("BFCL_PROJECT_ROOT", str(Path(tempfile.gettempdir()) / "slmgate-bfcl"))
    ours = types.SimpleNamespace(underscore_to_dot=False)
    name = "bfcl_eval.constants.model_config"
    stub = sys.modules.get(name)
    if stub is None:
        stub = types.ModuleType(name)
        stub.MODEL_CONFIG_MAPPING = {}  # type: ignore[attr-defined]
        sys.modules[name] = stub
    stub.MODEL_CONFIG_MAPPING.setdefault(CHECKER_MODEL, ours)

    from bfcl_eval import utils
    from bfcl_eval.constants.enums import Language, ModelStyle
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.model_handler.utils import convert_to_tool

    return types.SimpleNamespace(
        utils=utils,
        Language=Language,
        ModelStyle=ModelStyle,
        ast_checker=ast_checker,
        convert_to_tool=convert_to_tool,
        GORILLA_TO_OPENAPI=GORILLA_TO_OPENAPI,
    )


def resolve_categories(names: Sequence[str]) -> list[str]:
    """Canonical category names, in order, without repeats; ``ValueError`` on an unknown one."""
    out: list[str] = []
    for raw in names:
        name = ALIASES.get(raw.strip(), raw.strip())
        if name not in SUPPORTED_CATEGORIES:
            known = ", ".join(SUPPORTED_CATEGORIES)
            raise ValueError(f"unknown BFCL category {raw!r}; supported: {known}")
        if name not in out:
            out.append(name)
    return out


def is_relevance(category: str) -> bool:
    """(Ir)relevance categories have no ground truth: only *whether* a function is called."""
    return "relevance" in category


def load_items(category: str, limit: int | None = None, offset: int = 0) -> list[BfclItem]:
    """``limit`` entries of ``category`` (all when None) from ``offset``, in BFCL's file order
    (an offset keeps a calibration split apart from the evaluated items)."""
    b = bfcl().utils
    sent = b.load_dataset_entry(category, include_prereq=False)
    checked = b.load_dataset_entry(
        category, include_prereq=False, include_language_specific_hint=False
    )
    answers: dict[str, Any] = {}
    if not is_relevance(category):
        answers = {a["id"]: a["ground_truth"] for a in b.load_ground_truth_entry(category)}
    by_id = {e["id"]: e for e in checked}
    items = []
    for entry in sent[offset : offset + limit if limit is not None else len(sent)]:
        items.append(
            BfclItem(
                id=entry["id"],
                category=category,
                messages=list(entry["question"][0]),
                functions=entry["function"],
                checker_functions=by_id[entry["id"]]["function"],
                ground_truth=answers.get(entry["id"]) if answers else None,
            )
        )
    return items


def openai_tools(
    functions: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """BFCL function docs as OpenAI chat-completions tools, plus {tool name: BFCL name}.

    BFCL's own conversion for OpenAI-style models: its type mapping, and "." in a name becomes
    "_" (OpenAI names must match ``^[a-zA-Z0-9_-]{1,64}$``).
    """
    b = bfcl()
    tools: list[dict[str, Any]] = b.convert_to_tool(
        list(functions), b.GORILLA_TO_OPENAPI, b.ModelStyle.OPENAI_COMPLETIONS
    )
    names = {t["function"]["name"]: f["name"] for t, f in zip(tools, functions, strict=True)}
    return tools, names


def tool_calls_of(message: dict[str, Any]) -> list[Call] | None:
    """The (name, arguments) of an OpenAI assistant message's tool calls; None when it has none
    (``tool_calls`` absent or null, as BFCL's handler reads it). Non-string arguments (not
    OpenAI's format) are re-serialised so the decoder sees JSON text."""
    raw = message.get("tool_calls")
    if not isinstance(raw, list):
        return None
    calls: list[Call] = []
    for call in raw:
        fn = call.get("function") if isinstance(call, dict) else None
        fn = fn if isinstance(fn, dict) else {}
        args = fn.get("arguments", "")
        calls.append((str(fn.get("name", "")), args if isinstance(args, str) else json.dumps(args)))
    return calls


def decode_calls(calls: Sequence[Call], names: dict[str, str]) -> list[dict[str, Any]]:
    """BFCL's FC decoding (``[{name: params}]``), with tool names mapped back to BFCL names.
    Raises on arguments that are not JSON, as BFCL's decoder does."""
    return [{names.get(name, name): json.loads(args)} for name, args in calls]


def _language(category: str) -> Any:
    b = bfcl()
    if b.utils.is_java(category):
        return b.Language.JAVA
    if b.utils.is_js(category):
        return b.Language.JAVASCRIPT
    return b.Language.PYTHON


def score(item: BfclItem, calls: Sequence[Call] | None, names: dict[str, str]) -> Verdict:
    """BFCL's verdict on the model's tool calls for ``item`` (None: the reply had none).

    Mirrors BFCL's runner for FC models: (ir)relevance items succeed iff the decoded output does
    (not) contain a call; the others must decode to ``[{name: params}]`` and pass the AST checker
    for the category's language.
    """
    b = bfcl()
    if is_relevance(item.category):
        try:
            contains = calls is not None and not b.utils.is_empty_output(decode_calls(calls, names))
        except Exception:
            contains = False  # BFCL: output that does not decode is not a function call
        irrelevance = "irrelevance" in item.category
        if contains == (not irrelevance):
            return Verdict(True)
        kind = "irrelevance_error:decoder_success" if irrelevance else "relevance_error:no_call"
        return Verdict(False, kind, ("called a function" if irrelevance else "no call",))
    if calls is None:
        return Verdict(False, "ast_decoder:decoder_failed", ("no function call in the reply",))
    try:
        decoded = decode_calls(calls, names)
    except Exception as exc:
        return Verdict(False, "ast_decoder:decoder_failed", (f"{type(exc).__name__}: {exc}",))
    if not b.utils.is_function_calling_format_output(decoded):
        return Verdict(False, "ast_decoder:decoder_wrong_output_format", (repr(decoded)[:200],))
    try:
        result = b.ast_checker(
            copy.deepcopy(item.checker_functions),
            decoded,
            copy.deepcopy(item.ground_truth),
            _language(item.category),
            item.category,
            CHECKER_MODEL,
        )
    except Exception as exc:  # a checker crash on odd output is that item's failure, not ours
        return Verdict(False, f"checker_error:{type(exc).__name__}", (str(exc)[:200],))
    if result["valid"]:
        return Verdict(True)
    errors = result.get("error", [])
    return Verdict(False, result.get("error_type"), tuple(str(e) for e in errors))


def executable(calls: Sequence[Call] | None, tools: Sequence[dict[str, Any]]) -> bool | None:
    """Whether every call names an offered tool and its arguments validate against that tool's
    parameters (jsonschema); None when the reply made no call."""
    if not calls:
        return None
    params = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools}
    for name, args in calls:
        if name not in params:
            return False
        try:
            value = json.loads(args)
        except ValueError:
            return False
        if not isinstance(value, dict):
            return False
        try:
            if validation_errors(value, params[name], limit=1):
                return False
        except Exception:  # a tool schema jsonschema cannot use: not checkable, so not proven
            return False
    return True
