"""Tree attention masks: literal small trees, and the Triton kernel equal to the reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels.tree_mask import additive_mask, build_tree_mask, tree_mask_reference
from kernels.triton_tree_mask import tree_mask_triton

Builder = Callable[..., tuple[torch.Tensor, torch.Tensor]]

BUILDERS = [
    pytest.param(tree_mask_reference, "cpu", id="torch"),
    pytest.param(tree_mask_triton, "cuda", id="triton", marks=pytest.mark.gpu),
    pytest.param(build_tree_mask, "cuda", id="dispatch-cuda", marks=pytest.mark.gpu),
]


def brute_force(parents: list[int], past: int, n_pending: int) -> tuple[list[list[int]], list[int]]:
    """Ancestor sets by walking each node's parent chain, the definition written out."""
    n = len(parents)
    q = n_pending + n
    mask = [[0] * (past + q) for _ in range(q)]
    positions = []
    for r in range(q):
        for c in range(past):
            mask[r][c] = 1
        if r < n_pending:
            for c in range(r + 1):
                mask[r][past + c] = 1
            positions.append(past + r)
            continue
        for c in range(n_pending):
            mask[r][past + c] = 1
        node, depth = r - n_pending, 0
        mask[r][past + n_pending + node] = 1
        parent = parents[node]
        while parent >= 0:
            mask[r][past + n_pending + parent] = 1
            depth += 1
            parent = parents[parent]
        positions.append(past + n_pending + depth)
    return mask, positions


@pytest.mark.parametrize(("build", "device"), BUILDERS)
def test_literal_tree(build: Builder, device: str) -> None:
    # Two branches after the pending token: 5 -> 7 and 6; node 3 hangs under node 1.
    mask, positions = build([-1, -1, 0, 1], past=2, n_pending=1, device=device)
    assert positions.tolist() == [2, 3, 3, 4, 4]
    assert mask.int().tolist() == [
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0],
        [1, 1, 1, 1, 0, 1, 0],
        [1, 1, 1, 0, 1, 0, 1],
    ]


@pytest.mark.parametrize(("build", "device"), BUILDERS)
def test_a_chain_is_causal(build: Builder, device: str) -> None:
    mask, positions = build([-1, 0, 1, 2], past=3, n_pending=2, device=device)
    q = 6
    expected = torch.ones(q, 3 + q, dtype=torch.bool).tril(diagonal=3)
    assert torch.equal(mask.cpu(), expected)
    assert positions.tolist() == list(range(3, 9))


@pytest.mark.parametrize(("build", "device"), BUILDERS)
@pytest.mark.parametrize("seed", range(20))
def test_random_trees_match_the_definition(build: Builder, device: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 40, (), generator=gen))
    parents = [int(torch.randint(-1, i, (), generator=gen)) for i in range(n)]
    past = int(torch.randint(0, 300, (), generator=gen))  # beyond one Triton block too
    n_pending = int(torch.randint(1, 5, (), generator=gen))
    mask, positions = build(parents, past=past, n_pending=n_pending, device=device)
    expected_mask, expected_positions = brute_force(parents, past, n_pending)
    assert mask.int().cpu().tolist() == expected_mask
    assert positions.cpu().tolist() == expected_positions


def test_invalid_parents_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="parent"):
        tree_mask_reference([0], past=0, n_pending=1)
    with pytest.raises(ValueError, match="n_pending"):
        tree_mask_reference([-1], past=0, n_pending=0)


def test_additive_mask_blocks_with_the_dtype_minimum() -> None:
    mask, _ = tree_mask_reference([-1, -1], past=0, n_pending=1)
    additive = additive_mask(mask, torch.bfloat16)
    assert additive.shape == (1, 1, 3, 3)
    assert additive[0, 0, 2, 1] == torch.finfo(torch.bfloat16).min
    assert additive[0, 0, 2, 2] == 0


def test_dispatch_on_cpu_is_the_reference() -> None:
    got = build_tree_mask([-1, 0, -1], past=4, n_pending=2)
    want = tree_mask_reference([-1, 0, -1], past=4, n_pending=2)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
