"""Occurrence counts of every substring of some token sequences, in a suffix automaton.

SuffixDecoding needs two queries: the longest suffix of a context that occurred before, and how
often each token followed it. The paper's suffix tree answers both; a bounded-depth suffix trie
is the simple version, but it creates up to ``max_depth`` nodes per token (measured here: 0.3 to
0.9 s and 300k nodes to index one 5k-token prompt at depth 64). A suffix automaton answers the
same queries with at most ``2n`` states, built online in amortised constant time per token, so a
request's index grows as the model emits tokens and is never rebuilt.

Each state is a set of substrings that end at exactly the same positions (their *endpos*):

- ``count``: how many positions that is, i.e. how often each of its strings occurs;
- ``next[token]``: the state of those strings extended by ``token``; its ``count`` is how often
  ``token`` followed them, so continuation frequencies are ``child.count / sum(child counts)``;
- ``link``: the state of the longest shorter suffix with more occurrences. Following links from
  the state of a string visits every suffix of it, which makes longest-suffix matching one
  left-to-right pass over the context, and lets an append count the new end position for every
  suffix at once.

Removing a sequence walks it again and undoes its counts. States whose count drops to 0 stay in
the structure but count as absent; once dead tokens outnumber live ones the automaton is rebuilt
from the live sequences, so memory stays proportional to what is stored.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["State", "SuffixAutomaton", "has_continuation", "longest_match"]

# Rebuild only when dead tokens exceed live ones by this much, so small caches do not rebuild
# on every eviction.
_REBUILD_SLACK = 4096


class State:
    """Substrings sharing one set of end positions (see the module docstring)."""

    __slots__ = ("count", "length", "link", "next")

    def __init__(self, length: int, link: State | None) -> None:
        self.next: dict[int, State] = {}
        self.count = 0
        self.length = length  # of the longest string in the state
        self.link = link  # None only for the root (the empty string)


class SuffixAutomaton:
    """Substring counts over a set of token sequences; the newest one can keep growing.

    Sequences are added whole or grown with :meth:`append`; only the most recently added one
    can grow, because online construction is only valid for the string being extended last.
    """

    def __init__(self) -> None:
        self.root = State(0, None)
        self._sequences: dict[int, list[int]] = {}
        self._next_id = 0
        self._open: int | None = None  # the sequence append() extends
        self._last = self.root  # state of the whole open sequence
        self._live_tokens = 0
        self._total_tokens = 0  # inserted since the last rebuild, removed ones included

    def __len__(self) -> int:
        """Number of stored sequences."""
        return len(self._sequences)

    @property
    def num_tokens(self) -> int:
        """Tokens over all stored sequences."""
        return self._live_tokens

    def sequence(self, seq_id: int) -> list[int]:
        """The tokens stored under ``seq_id`` (a copy)."""
        return list(self._sequences[seq_id])

    def add(self, token_ids: Sequence[int]) -> int:
        """Store a new sequence and return its id; it becomes the one :meth:`append` grows."""
        seq_id = self._next_id
        self._next_id += 1
        self._sequences[seq_id] = []
        self._open = seq_id
        self._last = self.root
        self.append(token_ids)
        return seq_id

    def append(self, token_ids: Sequence[int]) -> None:
        """Append tokens to the most recently added sequence.

        Raises
        ------
        ValueError
            If no sequence is open (none added yet, or the newest was removed).
        """
        if self._open is None:
            raise ValueError("No open sequence to append to; call add() first")
        for token in token_ids:
            self._extend(token)
        self._sequences[self._open].extend(token_ids)
        self._live_tokens += len(token_ids)
        self._total_tokens += len(token_ids)

    def remove(self, seq_id: int) -> None:
        """Forget a sequence: undo the counts of its substrings.

        Raises
        ------
        ValueError
            If ``seq_id`` is not stored.
        """
        if seq_id not in self._sequences:
            raise ValueError(f"Sequence {seq_id} is not stored")
        tokens = self._sequences.pop(seq_id)
        if seq_id == self._open:
            self._open = None
        state = self.root
        for token in tokens:
            # The automaton accepts every stored prefix, so this walk cannot fail.
            state = state.next[token]
            suffix: State | None = state
            while suffix is not None:
                suffix.count -= 1
                suffix = suffix.link
        self._live_tokens -= len(tokens)
        if self._total_tokens > 2 * self._live_tokens + _REBUILD_SLACK:
            self._rebuild()

    def count(self, token_ids: Sequence[int]) -> int:
        """How often ``token_ids`` occurs in the stored sequences (the empty string: tokens)."""
        state = self.root
        for token in token_ids:
            child = state.next.get(token)
            if child is None or child.count == 0:
                return 0
            state = child
        return state.count

    def _extend(self, token: int) -> None:
        """Online construction step for the open sequence (generalised to several strings)."""
        last = self._last
        existing = last.next.get(token)
        if existing is not None:
            # The extended string already occurs (as part of an earlier sequence).
            if existing.length == last.length + 1:
                grown = existing
            else:
                grown = self._split(last, token, existing)
        else:
            grown = State(last.length + 1, None)
            state: State | None = last
            while state is not None and token not in state.next:
                state.next[token] = grown
                state = state.link
            if state is None:
                grown.link = self.root
            else:
                target = state.next[token]
                if target.length == state.length + 1:
                    grown.link = target
                else:
                    grown.link = self._split(state, token, target)
        # One new end position for every suffix of the grown sequence.
        suffix: State | None = grown
        while suffix is not None:
            suffix.count += 1
            suffix = suffix.link
        self._last = grown

    @staticmethod
    def _split(state: State, token: int, target: State) -> State:
        """Move the strings of ``target`` up to ``state.length + 1`` tokens into a new state."""
        clone = State(state.length + 1, target.link)
        clone.next = dict(target.next)
        clone.count = target.count  # same end positions until the caller adds the new one
        walk: State | None = state
        while walk is not None and walk.next.get(token) is target:
            walk.next[token] = clone
            walk = walk.link
        target.link = clone
        return clone

    def _rebuild(self) -> None:
        """Start over from the live sequences, keeping their ids (oldest first)."""
        sequences, is_open = self._sequences, self._open is not None
        self.root = State(0, None)
        self._sequences = {}
        self._live_tokens = self._total_tokens = 0
        for seq_id, tokens in sequences.items():
            self._sequences[seq_id] = []
            self._open = seq_id
            self._last = self.root
            self.append(tokens)
        if not is_open:
            self._open = None


def longest_match(
    automaton: SuffixAutomaton, context_ids: Sequence[int], max_len: int
) -> tuple[State, int]:
    """The longest suffix of ``context_ids`` (at most ``max_len`` tokens) that occurred with a
    continuation: its state and its length. Length 0 (the root) means no match.

    Reads only the last ``max_len`` tokens, extending the match by each token or shortening
    it along suffix links until it can be extended. The match is then shortened until some
    occurrence has a next token: the request's own tail is an occurrence with none yet, and
    drafting from it would give nothing.

    Examples
    --------
    Stored ``[1, 2, 3, 9, 2, 3]``: ``[2, 3]`` occurs twice, once followed by 9.

    >>> automaton = SuffixAutomaton()
    >>> _ = automaton.add([1, 2, 3, 9, 2, 3])
    >>> longest_match(automaton, [7, 1, 2, 3], max_len=8)[1]  # [7, 1, 2, 3] never occurs
    3
    >>> longest_match(automaton, [7, 1, 2, 3], max_len=2)[1]  # only [2, 3] is read
    2
    >>> longest_match(automaton, [5, 9, 2, 3], max_len=8)[1]  # [9, 2, 3] only at the end
    2
    >>> longest_match(automaton, [4], max_len=8)[1]  # 4 never occurs
    0
    """
    root = automaton.root
    state, length = root, 0
    for token in context_ids[max(0, len(context_ids) - max_len) :]:
        while True:
            child = state.next.get(token)
            if child is not None and child.count > 0:
                state, length = child, length + 1
                break
            if state.link is None:
                length = 0  # at the root: no suffix ending in this token occurs
                break
            state = state.link
            length = state.length
    while state.link is not None and not has_continuation(state):
        state = state.link
        length = state.length
    return state, length


def has_continuation(state: State) -> bool:
    """Whether some occurrence of the state's strings is followed by a stored token."""
    return any(child.count > 0 for child in state.next.values())
