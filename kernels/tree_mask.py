"""Tree attention for draft verification: which positions each draft node may attend to.

A verification pass feeds ``n_pending`` ordinary tokens (a causal chain after the ``past``
cached positions) followed by the nodes of a draft tree (``parents[i]`` is the node's parent,
``-1`` for a child of the last pending token, always an earlier node). A node must see the
cache, the pending chain, its ancestors and itself, never a sibling branch, and it sits at the
position after its parent, so a branch is encoded as if it were the only continuation. One pass
then yields the target's distribution after every node, exactly as a chain would.

This is the torch reference; :mod:`kernels.triton_tree_mask` computes the same on CUDA, and
:func:`build_tree_mask` picks one at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["additive_mask", "build_tree_mask", "tree_mask_reference"]


def _check(parents: Sequence[int], past: int, n_pending: int) -> None:
    if past < 0 or n_pending < 1:
        raise ValueError(f"need past >= 0 and n_pending >= 1, got {past} and {n_pending}")
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}; it must be in [-1, {i - 1}]")


def tree_mask_reference(
    parents: Sequence[int], past: int, n_pending: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, positions)`` for ``n_pending`` chain tokens then the tree's nodes.

    ``mask`` is ``[q, past + q]`` bool (True: may attend) with ``q = n_pending + len(parents)``;
    ``positions`` is ``[q]`` int64 (cached tokens occupy ``0..past-1``).

    >>> mask, pos = tree_mask_reference([-1, -1, 0], past=1, n_pending=1)
    >>> pos.tolist()
    [1, 2, 2, 3]
    >>> mask.int().tolist()
    [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 1, 0, 1]]

    Raises
    ------
    ValueError
        If a parent does not point to an earlier node, or ``past``/``n_pending`` are invalid.
    """
    _check(parents, past, n_pending)
    n = len(parents)
    q = n_pending + n
    mask = torch.zeros(q, past + q, dtype=torch.bool, device=device)
    chain = torch.ones(n_pending, n_pending, dtype=torch.bool, device=device).tril()
    mask[:, :past] = True
    mask[:n_pending, past : past + n_pending] = chain
    mask[n_pending:, past : past + n_pending] = True
    depth = [0] * n
    start = past + n_pending
    for i, parent in enumerate(parents):
        row = n_pending + i
        if parent >= 0:
            mask[row, start : start + n] = mask[n_pending + parent, start : start + n]
            depth[i] = depth[parent] + 1
        mask[row, start + i] = True
    positions = torch.cat(
        [
            torch.arange(past, past + n_pending, device=device),
            torch.tensor(depth, dtype=torch.int64, device=device) + past + n_pending,
        ]
    )
    return mask, positions


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4D additive form models take (``[1, 1, q, k]``: 0 where allowed, the dtype's min
    elsewhere)."""
    blocked = torch.full(mask.shape, torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), blocked)[None, None]


def build_tree_mask(
    parents: Sequence[int], past: int, n_pending: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tree_mask_reference`'s result, from the Triton kernel on CUDA when it is present."""
    if torch.device(device).type == "cuda":
        from kernels import triton_tree_mask

        if triton_tree_mask.available():
            return triton_tree_mask.tree_mask_triton(parents, past, n_pending, device)
    return tree_mask_reference(parents, past, n_pending, device)
