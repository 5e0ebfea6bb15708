"""Which tool-call forms a model prefers, and what the tool grammar takes away from it.

For BFCL items, the model answers twice, greedy: with the tool grammar and freely (the same
prompt, its own chat template). Then the raw model's next-token distribution (no grammar) is read
at two points of the constrained answer: the first token, and right after the first complete
call. Probability mass is grouped by what each token starts:

* first token: a JSON fence (```` ``` ````), a bare object (``{``), an array (``[``), a
  ``<tool_call>`` tag (``<``), or text (anything else; what abstaining starts with);
* after the first call: another call (``{``, ``,{``, ``<tool_call>``), or stopping (a closing
  fence, ``]``, end of turn).

    python -m benchmarks.tool_forms --model builtin:qwen2.5-coder-0.5b-instruct \\
        --categories parallel,parallel_multiple,irrelevance --limit 6 --offset 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import bfcl_data, bfcl_eval
from decoding.chat_template import render_prompt
from decoding.constraint import NoConstraint
from decoding.models import ModelSpec, load_engine
from decoding.types import GenerationRequest
from decoding.validate import check_output
from router.request import generation_request
from schemas.chat import ChatCompletionRequest

FIRST = ("fence", "bare", "array", "tag", "text")
AFTER = ("another_call", "stop", "other")


def first_class(token_text: str) -> str:
    t = token_text.lstrip(" ")
    if t.startswith("`"):
        return "fence"
    if t.startswith("{"):
        return "bare"
    if t.startswith("["):
        return "array"
    if t.startswith("<"):
        return "tag"
    return "text"


def after_class(token_text: str, is_stop: bool) -> str:
    if is_stop:
        return "stop"
    t = token_text.lstrip(" \n,")
    if t.startswith("{") or t.startswith("<tool_call"):
        return "another_call"
    if t.startswith("`") or t.startswith("]") or t.startswith("</"):
        return "stop"
    return "other"


def end_of_first_call(text: str) -> int | None:
    """Index just after the first top-level ``{...}`` object (strings respected), or None."""
    depth, in_string, escaped, started = 0, False, False, False
    for i, ch in enumerate(text):
        if in_string:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string, escaped = True, False
        elif ch == "{":
            depth, started = depth + 1, True
        elif ch == "}":
            depth -= 1
            if started and depth == 0:
                return i + 1
    return None


def grouped(probs: torch.Tensor, classes: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    out = dict.fromkeys(names, 0.0)
    for name in names:
        mask = torch.tensor([c == name for c in classes])
        out[name] = float(probs[mask].sum())
    return out


@dataclass
class ItemReport:
    category: str
    id: str
    constrained: str
    free: str
    calls_constrained: int
    calls_free: int
    ok_constrained: bool
    ok_free: bool
    first: dict[str, float] = field(default_factory=dict)
    after_first_call: dict[str, float] | None = None


def run(args: argparse.Namespace) -> list[ItemReport]:
    engine = load_engine(ModelSpec(name="probe", source=args.model))
    tok, model = engine.tokenizer, engine.model
    vocab = [engine.token_text(i) for i in range(engine.vocab_size)]
    stops = set(engine.stop_ids)
    first_classes = [first_class(t) for t in vocab]
    after_classes = [after_class(t, i in stops) for i, t in enumerate(vocab)]
    reports = []
    for category in args.categories.split(","):
        for item in bfcl_data.load_items(category, args.limit, args.offset):
            tools, names = bfcl_data.openai_tools(item.functions)
            body = bfcl_eval.build_request(item, tools, "probe", args.max_tokens)
            req = generation_request(ChatCompletionRequest.model_validate(body), "probe")
            free_req = GenerationRequest(req.messages, req.params, NoConstraint(), req.tools)
            texts, calls, oks = [], [], []
            for r in (req, free_req):
                text = engine.complete_sync(r).choices[0].text
                parsed = check_output(req.constraint, text).parsed
                found = [(c.name, c.arguments) for c in parsed.tool_calls] if parsed else []
                texts.append(text)
                calls.append(len(found))
                oks.append(bfcl_data.score(item, found or None, names).success)
            prompt = render_prompt(tok, list(req.messages), list(req.tools))

            def next_probs(prefix: str, prompt: list[int] = prompt) -> torch.Tensor:
                ids = prompt + tok.encode(prefix, add_special_tokens=False)
                with torch.inference_mode():
                    logits = model(torch.tensor([ids], device=model.device)).logits[0, -1]
                return torch.softmax(logits.float(), -1)[: len(vocab)].cpu()

            report = ItemReport(category, item.id, texts[0], texts[1], calls[0], calls[1],
                                oks[0], oks[1])  # fmt: skip
            report.first = grouped(next_probs(""), first_classes, FIRST)
            end = end_of_first_call(texts[0])
            if end is not None:
                # Read past the closing "}}" and a newline: the tokenizer merges "}}\n" into one
                # token, so the choice between another call and stopping comes after it.
                while end < len(texts[0]) and texts[0][end] in "}\n" and texts[0][end - 1] != "\n":
                    end += 1
                report.after_first_call = grouped(next_probs(texts[0][:end]), after_classes, AFTER)
            reports.append(report)
            print(json.dumps({k: v for k, v in vars(report).items() if k not in ("free",)})[:400],
                  file=sys.stderr, flush=True)  # fmt: skip
    return reports


def summary(reports: Sequence[ItemReport]) -> str:
    lines = ["| category | items | first token: fence / bare / array / tag / text "
             "| after the first call: another / stop / other "
             "| calls (constrained, free) | correct (constrained, free) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for category in dict.fromkeys(r.category for r in reports):
        rows = [r for r in reports if r.category == category]
        first = " / ".join(f"{statistics.mean(r.first[k] for r in rows):.2f}" for k in FIRST)
        after_rows = [r.after_first_call for r in rows if r.after_first_call is not None]
        after = "-" if not after_rows else " / ".join(
            f"{statistics.mean(a[k] for a in after_rows):.2f}" for k in AFTER)  # fmt: skip
        calls = (f"{statistics.mean(r.calls_constrained for r in rows):.2f}, "
                 f"{statistics.mean(r.calls_free for r in rows):.2f}")  # fmt: skip
        oks = f"{sum(r.ok_constrained for r in rows)}, {sum(r.ok_free for r in rows)}"
        lines.append(f"| {category} | {len(rows)} | {first} | {after} | {calls} | {oks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tool_forms", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--categories", default="parallel,parallel_multiple,irrelevance")
    p.add_argument("--limit", type=int, default=6)
    p.add_argument("--offset", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    reports = run(args)
    print(f"model {args.model}, BFCL items {args.offset}..{args.offset + args.limit - 1} per "
          f"category, greedy, max_tokens {args.max_tokens}")  # fmt: skip
    print(summary(reports))
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in reports], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
