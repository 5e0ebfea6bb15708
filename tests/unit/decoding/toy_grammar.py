"""Both grammar engines on one toy vocabulary, so every grammar test runs against each."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from decoding.constraint import GrammarEngine, ToolCalls
from decoding.grammar import GrammarCompiler
from decoding.grammar_compile import GrammarLimits
from decoding.llguidance_engine import LLGuidanceEngine
from decoding.tool_grammar import tool_call_structural_tag
from decoding.tool_lark import tool_call_lark

# Single characters plus a few merged tokens; id 0 is the end-of-text token.
VOCAB = ["</s>", *list('{}[]":, abcdefghijklmnopqrstuvwxyz0123456789_-.\n<>/'), '{"', '":', '"}']
ENGINES: tuple[GrammarEngine, ...] = ("xgrammar", "llguidance")

# Every printable ASCII character, for checking whole strings against a grammar.
CHARS = ["</s>", *(chr(i) for i in range(32, 127)), "\n"]


class ToyTokenizer:
    """What llguidance's ``TokenizerWrapper`` reads: token bytes, EOS, a greedy encoder."""

    def __init__(self, vocab: list[str]):
        self.bos_token_id = None
        self.eos_token_id = 0
        self.special_token_ids = [0]
        self.vocab = vocab
        self.tokens = [b"<|eos|>", *(v.encode() for v in vocab[1:])]
        self._longest = max(len(v) for v in vocab)

    def __call__(self, text: str | bytes) -> list[int]:
        text = text.decode() if isinstance(text, bytes) else text
        ids, at = [], 0
        while at < len(text):
            for width in range(min(self._longest, len(text) - at), 0, -1):
                piece = text[at : at + width]
                if piece in self.vocab[1:]:
                    ids.append(self.vocab.index(piece))
                    at += width
                    break
            else:
                raise ValueError(f"no token for {text[at]!r}")
        return ids


def llguidance_tokenizer(vocab: list[str]) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(ToyTokenizer(vocab)))


def toy_compiler(engine: GrammarEngine = "auto", vocab: list[str] | None = None,
                 **kwargs: Any) -> GrammarCompiler:  # fmt: skip
    """A compiler over ``vocab`` (default ``VOCAB``) with both engines, ``engine`` by default."""
    vocab = vocab or VOCAB
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, stop_token_ids=[0])
    llg = LLGuidanceEngine.for_tokenizer(llguidance_tokenizer(vocab), len(vocab))
    kwargs.setdefault("limits", GrammarLimits())
    return GrammarCompiler(info, llguidance=llg, default_engine=engine, **kwargs)


_CHAR_TOKENIZER: list[llguidance.LLTokenizer] = []


def tools_accept(engine: GrammarEngine, constraint: ToolCalls, text: str) -> bool:
    """Whether ``engine``'s tool-call grammar for ``constraint`` accepts exactly ``text``."""
    if engine == "xgrammar":
        tag = json.dumps(tool_call_structural_tag(constraint))
        return bool(_is_grammar_accept_string(xgr.Grammar.from_structural_tag(tag), text))
    if not _CHAR_TOKENIZER:
        _CHAR_TOKENIZER.append(llguidance_tokenizer(CHARS))
    grammar = llguidance.LLMatcher.grammar_from_lark(tool_call_lark(constraint))
    matcher = llguidance.LLMatcher(_CHAR_TOKENIZER[0], grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ok = matcher.consume_tokens([CHARS.index(c) for c in text])
    return bool(ok and not matcher.is_error() and matcher.is_accepting())
