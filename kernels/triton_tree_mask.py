"""Triton version of :func:`kernels.tree_mask.tree_mask_reference` (same result, on CUDA).

One program per query row: chain rows fill their causal prefix; a tree row walks its parent
chain (at most the draft's depth) and marks each ancestor, so no row depends on another and the
whole mask is built in one launch instead of a Python loop over nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.tree_mask import _check

__all__ = ["available", "tree_mask_triton"]

try:  # optional: Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


def available() -> bool:
    """Whether the kernel can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _tree_mask_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations
        parents_ptr,
        mask_ptr,
        depth_ptr,
        past,
        n_pending,
        width,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        row_ptr = mask_ptr + row * width
        # Everyone sees the cache; chain row r sees pending 0..r; tree rows see all pending.
        limit = past + tl.minimum(row + 1, n_pending)
        for start in range(0, width, BLOCK):
            c = start + cols
            tl.store(row_ptr + c, (c < limit).to(tl.int8), mask=c < width)
        if row >= n_pending:
            node = row - n_pending
            depth = 0
            base = past + n_pending
            tl.store(row_ptr + base + node, tl.full((), 1, tl.int8))
            parent = tl.load(parents_ptr + node)
            while parent >= 0:
                tl.store(row_ptr + base + parent, tl.full((), 1, tl.int8))
                depth += 1
                parent = tl.load(parents_ptr + parent)
            tl.store(depth_ptr + node, depth)


def tree_mask_triton(
    parents: Sequence[int], past: int, n_pending: int, device: torch.device | str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`kernels.tree_mask.tree_mask_reference`, computed on CUDA.

    Raises
    ------
    RuntimeError
        If Triton or CUDA is missing.
    ValueError
        On invalid parents or sizes.
    """
    if not available():
        raise RuntimeError("the Triton tree mask needs Triton and a CUDA device")
    _check(parents, past, n_pending)
    n = len(parents)
    q = n_pending + n
    width = past + q
    mask = torch.empty(q, width, dtype=torch.int8, device=device)
    depth = torch.zeros(max(n, 1), dtype=torch.int64, device=device)
    parent_ids = torch.tensor(list(parents) or [-1], dtype=torch.int64, device=device)
    _tree_mask_kernel[(q,)](parent_ids, mask, depth, past, n_pending, width, BLOCK=256)
    positions = torch.cat(
        [torch.arange(past, past + n_pending, device=device), depth[:n] + past + n_pending]
    )
    return mask.bool(), positions
