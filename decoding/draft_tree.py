"""Draft trees in verification: which drafted nodes may go through the model at all, where the
walk over an accepted branch goes next, and which KV-cache rows the accepted branch keeps.
Pure except ``keep_accepted_rows``, which edits a transformers cache in place."""

from __future__ import annotations

from collections.abc import Collection

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from decoding.grammar import GrammarState
from spec.draft import Draft


def prune_draft(
    draft: Draft, depth: int, stop_ids: Collection[int], grammar: GrammarState | None
) -> Draft:
    """``draft`` without nodes deeper than ``depth``, stop tokens (the end of a turn is the
    model's own pick, never drafted) and tokens the grammar forbids, with their subtrees.

    The grammar checks each leaf's path once (``validate_tokens`` does not advance the
    matcher); a node stays when the grammar accepts its whole path from the root.
    """
    if not draft.token_ids:
        return draft
    paths: list[list[int]] = []
    alive: list[bool] = []
    for token, parent in zip(draft.token_ids, draft.parents, strict=True):
        base = paths[parent] if parent >= 0 else []
        paths.append([*base, token])
        alive.append((parent < 0 or alive[parent]) and token not in stop_ids and len(base) < depth)
    if grammar is not None:
        live_parents = {p for p, a in zip(draft.parents, alive, strict=True) if a}
        allowed = [False] * len(draft)
        for leaf in range(len(draft)):
            if not alive[leaf] or leaf in live_parents:
                continue  # dead, or its path is checked through a live child
            valid = grammar.validate_tokens(paths[leaf])
            node = leaf
            while node >= 0:
                if len(paths[node]) <= valid:
                    allowed[node] = True
                node = draft.parents[node]
        alive = [a and ok for a, ok in zip(alive, allowed, strict=True)]
    kept = [i for i, a in enumerate(alive) if a]
    if len(kept) == len(draft):
        return draft
    new_index = {old: new for new, old in enumerate(kept)}
    return Draft(
        tuple(draft.token_ids[i] for i in kept),
        tuple(new_index.get(draft.parents[i], -1) for i in kept),
        tuple(draft.scores[i] for i in kept),
    )


def child_map(draft: Draft) -> dict[tuple[int, int], int]:
    """``(parent node, token) -> child node``: where the verification walk goes next."""
    children: dict[tuple[int, int], int] = {}
    for i, (token, parent) in enumerate(zip(draft.token_ids, draft.parents, strict=True)):
        children.setdefault((parent, token), i)
    return children


def keep_accepted_rows(cache: DynamicCache, base: int, accepted: list[int]) -> None:
    """Keep the first ``base`` cached positions and the accepted draft nodes' rows after them.

    A chain's accepted nodes are its first ones, so the cache is cropped; a tree's accepted
    branch may sit anywhere among the nodes, so its rows are gathered into place."""
    if accepted == list(range(len(accepted))):
        extra = cache.get_seq_length() - base - len(accepted)
        if extra > 0:
            cache.crop(-extra)
        return
    rows = torch.tensor(accepted, dtype=torch.long) + base
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer):  # the embedded models' caches are dynamic
            raise TypeError(f"cannot gather rows of a {type(layer).__name__}")
        keys, values = layer.keys, layer.values
        if keys is None or values is None:  # a layer that never saw a token
            continue
        index = rows.to(keys.device)
        layer.keys = torch.cat([keys[..., :base, :], keys.index_select(-2, index)], dim=-2)
        layer.values = torch.cat([values[..., :base, :], values.index_select(-2, index)], dim=-2)
