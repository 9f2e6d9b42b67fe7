from __future__ import annotations

import pytest
import torch

from llmpress.compress.masks import layer_mask, nm_mask, row_mask, select_mask


def _scores(rows: int = 16, cols: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_row_mask_prunes_exact_count_per_row(sparsity: float) -> None:
    scores = _scores()
    mask = row_mask(scores, sparsity)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    expected_pruned = round(32 * sparsity)
    assert (~mask).sum(dim=1).tolist() == [expected_pruned] * 16


def test_row_mask_keeps_highest_scores_in_each_row() -> None:
    scores = _scores()
    mask = row_mask(scores, 0.5)
    for row in range(scores.shape[0]):
        kept, pruned = scores[row][mask[row]], scores[row][~mask[row]]
        assert kept.min() > pruned.max()
        top = torch.topk(scores[row], 16).indices
        assert set(top.tolist()) == set(torch.nonzero(mask[row]).flatten().tolist())


def test_row_mask_exact_on_known_values() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    mask = row_mask(scores, 0.5)
    assert mask.tolist() == [[True, False, True, False], [False, True, True, False]]


def test_row_mask_ties_broken_by_position() -> None:
    mask = row_mask(torch.ones(2, 6), 0.5)
    assert mask.tolist() == [[False, False, False, True, True, True]] * 2


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_layer_mask_prunes_exact_count_and_lowest_overall(sparsity: float) -> None:
    scores = _scores(seed=1)
    mask = layer_mask(scores, sparsity)
    assert mask.shape == scores.shape
    assert int((~mask).sum()) == round(scores.numel() * sparsity)
    assert scores[mask].min() > scores[~mask].max()


def test_layer_mask_is_not_per_row() -> None:
    # Row 0 holds all the small scores: a whole-layer mask prunes row 0 entirely and leaves row 1 dense.
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    mask = layer_mask(scores, 0.5)
    assert mask.tolist() == [[False] * 4, [True] * 4]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_keeps_exactly_n_per_group_of_the_highest(n: int, m: int) -> None:
    scores = _scores(seed=2)
    mask = nm_mask(scores, n, m)
    groups_mask = mask.reshape(16, 32 // m, m)
    groups_scores = scores.reshape(16, 32 // m, m)
    assert (groups_mask.sum(dim=2) == n).all()
    kept_min = torch.where(groups_mask, groups_scores, torch.inf).min(dim=2).values
    pruned_max = torch.where(groups_mask, -torch.inf, groups_scores).max(dim=2).values
    assert (kept_min > pruned_max).all()
    assert (~mask).float().mean().item() == pytest.approx(1 - n / m)


def test_nm_mask_exact_on_known_values() -> None:
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, False, True, False]]


def test_nm_mask_refuses_input_size_not_multiple_of_m() -> None:
    with pytest.raises(ValueError, match=r"input size \(30\).*multiple of 4"):
        nm_mask(torch.rand(4, 30), 2, 4)


def test_sparsity_zero_keeps_everything() -> None:
    scores = _scores()
    assert row_mask(scores, 0.0).all()
    assert layer_mask(scores, 0.0).all()
    assert layer_mask(scores, 0.0).shape == scores.shape


def test_select_mask_dispatch() -> None:
    scores = _scores(seed=3)
    assert torch.equal(select_mask(scores, None, (2, 4), per_row=True), nm_mask(scores, 2, 4))
    assert torch.equal(select_mask(scores, 0.5, None, per_row=True), row_mask(scores, 0.5))
    assert torch.equal(select_mask(scores, 0.5, None, per_row=False), layer_mask(scores, 0.5))


def test_masks_prune_exactly_what_a_stable_sort_would() -> None:
    """Selection (kthvalue) picks the same weights as the first entries of a stable argsort, ties by position."""

    generator = torch.Generator().manual_seed(0)
    for trial in range(100):
        rows, cols = torch.randint(1, 40, (2,), generator=generator).tolist()
        scores = (torch.randint(0, 4, (rows, cols), generator=generator).float() if trial % 2  # many ties
                  else torch.randn(rows, cols, generator=generator))  # fmt: skip
        for sparsity in (0.0, 0.1, 0.5, 0.77, 0.99):
            n_row, n_layer = round(cols * sparsity), round(scores.numel() * sparsity)
            by_row = torch.ones_like(scores, dtype=torch.bool)
            by_row.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :n_row], False)
            by_layer = torch.ones(scores.numel(), dtype=torch.bool)
            by_layer[torch.argsort(scores.flatten(), stable=True)[:n_layer]] = False
            assert torch.equal(row_mask(scores, sparsity), by_row)
            assert torch.equal(layer_mask(scores, sparsity), by_layer.view_as(scores))
