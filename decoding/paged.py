"""One forward pass over many sequences: ragged rows, key/value rows in a shared slot pool.

The batched engine flattens every running sequence's new tokens (one decode row, a prefill
chunk, a verification pass's pending token and draft nodes) into one ``[1, T]`` input, so the
weight-bound linear layers read the weights once for all of them. transformers runs the model
as usual (its norms, rotary embeddings, MLPs: the same numerics as the serial engine); only
attention differs. With ``paged=PagedBatch`` among the forward's keyword arguments (they reach
the attention function), :func:`paged_attention` writes each new token's key/value row into
its slot of the :class:`KVPool` and attends each sequence's queries to its own slots: the
cached ones in position order, then its new tokens under its own mask (causal for a chain, the
tree mask for a draft). Sequences never see each other's rows.

Slots are handed out in fixed-size blocks by ``decoding.block_manager``; a slot index is
``block * block_size + offset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kernels.tree_mask import build_tree_mask

__all__ = [
    "KVPool", "PagedBatch", "SequencePass", "SequenceRows", "block_slots", "paged_attention",
    "run_batch",
]  # fmt: skip


class KVPool:
    """Key/value rows of every layer for ``num_slots`` token positions (``[kv_heads, slots,
    head_dim]`` per layer), owned by one engine and written only by its scheduler thread."""

    def __init__(self, model: Any, num_slots: int) -> None:
        config = model.config
        heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", heads))
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.layers = int(config.num_hidden_layers)
        self.num_slots = num_slots
        shape = (self.kv_heads, num_slots, self.head_dim)
        device, dtype = model.device, model.dtype
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.layers)]

    @staticmethod
    def bytes_per_token(model: Any) -> int:
        """What one token position costs in the pool (keys and values of every layer)."""
        config = model.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", heads))
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        item = torch.empty((), dtype=model.dtype).element_size()
        return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * item

    def copy_rows(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy the rows of slots ``src`` into slots ``dst`` in every layer (accepted draft
        nodes move to the positions after the cached ones)."""
        if not src:
            return
        source = torch.tensor(list(src), device=self.keys[0].device)
        target = torch.tensor(list(dst), device=self.keys[0].device)
        for keys, values in zip(self.keys, self.values, strict=True):
            keys.index_copy_(1, target, keys.index_select(1, source))
            values.index_copy_(1, target, values.index_select(1, source))


@dataclass(frozen=True, slots=True)
class SequenceRows:
    """One sequence's part of a pass: ``length`` query rows from ``start`` of the flat input,
    its key/value ``slots`` (cached positions, then one per new row), and how its rows attend:

    - ``row``: one row, which sees every slot (query heads folded onto their key/value head);
    - ``causal``: a prompt's first chunk, SDPA's causal kernel, no mask;
    - ``chunk``: a later prompt chunk, ``mask`` ``[length, cached + length]``, SDPA maps query
      heads to key/value heads itself (its fused kernel; the folded form falls back to the
      math path under a mask, far slower on long chunks);
    - ``tree``: a verification pass with drafts, ``mask`` ``[groups * length, cached + length]``
      with query heads folded, as the serial engine verifies (``decoding.attention``).
    """

    start: int
    length: int
    slots: torch.Tensor  # [cached + length] int64
    kind: Literal["row", "causal", "chunk", "tree"]
    mask: torch.Tensor | None = None
    span: tuple[int, int] | None = None  # the slots as one run [first, last + 1), when they are

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """This sequence's rows of one layer's keys or values (a view when they are one run)."""
        if self.span is not None:
            return rows[:, self.span[0] : self.span[1]]
        return rows.index_select(1, self.slots)


@dataclass(frozen=True, slots=True)
class PagedBatch:
    pool: KVPool
    rows: tuple[SequenceRows, ...]
    write_slots: torch.Tensor  # [T] int64: where each new row's key/value goes


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    batch: PagedBatch,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of a flattened pass (``query`` ``[1, heads, T, d]``, ``key``/``value`` the new
    rows ``[1, kv_heads, T, d]``); returns ``[1, T, heads, d]``. Query heads are folded onto
    their key/value head as in ``decoding.attention.grouped_sdpa``."""
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    keys, values = batch.pool.keys[layer], batch.pool.values[layer]
    keys.index_copy_(1, batch.write_slots, key[0])
    values.index_copy_(1, batch.write_slots, value[0])
    _, heads, _, dim = query.shape
    kv_heads = keys.shape[0]
    groups = heads // kv_heads
    parts: list[torch.Tensor] = []
    for part in batch.rows:
        # 4D inputs throughout: SDPA's fused CPU kernel takes only those (3D falls back).
        q = query[:, :, part.start : part.start + part.length]  # [1, heads, q, d]
        k, v = part.read(keys)[None], part.read(values)[None]
        if part.kind in ("causal", "chunk"):  # SDPA maps query heads to key/value heads
            attended = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=part.mask, scale=scaling, is_causal=part.kind == "causal",
                enable_gqa=True,
            )  # fmt: skip
        else:
            folded = q.reshape(1, kv_heads, groups * part.length, dim)
            attended = torch.nn.functional.scaled_dot_product_attention(
                folded, k, v, attn_mask=part.mask, scale=scaling
            )
        parts.append(attended.reshape(heads, part.length, dim).transpose(0, 1))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out[None]


@dataclass(frozen=True, slots=True)
class SequencePass:
    """What one sequence feeds a pass: ``ids`` after ``cached`` positions held in ``slots``
    (``len(slots) >= cached + len(ids)``; the new rows go to ``slots[cached:cached+len(ids)]``),
    the draft's ``parents`` for its last ``len(parents)`` ids (a chain when all are ``i-1``),
    and how many of its last rows' logits are wanted (0: a prefill chunk)."""

    ids: Sequence[int]
    cached: int
    slots: torch.Tensor  # int64
    parents: Sequence[int] = ()
    logits: int = 1


def block_slots(blocks: Sequence[int], block_size: int, positions: int) -> torch.Tensor:
    """Pool slots of the first ``positions`` positions of a sequence holding ``blocks``.

    >>> block_slots([3, 1], 4, 6).tolist()
    [12, 13, 14, 15, 4, 5]
    """
    table = torch.tensor(list(blocks), dtype=torch.int64)  # int64 even when empty
    return (table[:, None] * block_size + torch.arange(block_size)).flatten()[:positions]


def run_batch(model: Any, pool: KVPool, passes: Sequence[SequencePass]) -> list[torch.Tensor]:
    """One forward pass over ``passes``; returns each pass's wanted logits rows (float32,
    ``[logits, vocab]``, empty for a prefill chunk)."""
    device = model.device
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    writes: list[torch.Tensor] = []
    rows: list[SequenceRows] = []
    keep: list[int] = []
    heads = int(model.config.num_attention_heads)
    groups = heads // pool.kv_heads
    for p in passes:
        n = len(ids)
        length = len(p.ids)
        n_draft = len(p.parents)
        slots = p.slots[: p.cached + length].to(device)
        kind: Literal["row", "causal", "chunk", "tree"] = (
            "row" if length == 1 else "tree" if n_draft else "causal" if p.cached == 0 else "chunk"
        )
        mask = None
        position = torch.arange(p.cached, p.cached + length, device=device)
        if kind in ("chunk", "tree"):
            mask, position = build_tree_mask(list(p.parents), p.cached, length - n_draft, device)
        if kind == "tree" and mask is not None:
            mask = mask[None].expand(groups, length, p.cached + length)
            mask = mask.reshape(groups * length, p.cached + length)
        ids.extend(p.ids)
        positions.append(position)
        writes.append(slots[p.cached :])
        first, last = int(slots[0]), int(slots[-1])
        span = (first, last + 1) if last - first + 1 == len(slots) and _ascending(slots) else None
        rows.append(SequenceRows(n, length, slots, kind, mask, span))
        keep.extend(range(n + length - p.logits, n + length))
    batch = PagedBatch(pool, tuple(rows), torch.cat(writes))
    # A 4D mask is taken as prepared; the attention ignores it and reads ``paged``.
    unused_mask = torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=device)
    out = model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.cat(positions)[None],
        attention_mask=unused_mask,
        use_cache=False,
        logits_to_keep=torch.tensor(keep, dtype=torch.int64, device=device),
        paged=batch,
    )
    logits: torch.Tensor = out.logits[0].float()
    result: list[torch.Tensor] = []
    offset = 0
    for p in passes:
        result.append(logits[offset : offset + p.logits])
        offset += p.logits
    return result


def _ascending(slots: torch.Tensor) -> bool:
    """Whether ``slots`` step by one (a run of consecutive slots)."""
    return len(slots) < 2 or bool((slots[1:] - slots[:-1] == 1).all())
