"""SMF diagnosis figures on a hand-made access log (8 slots, 1 head, k = 2)."""

import math

import pytest
import torch

from forgetless.evaluate.smf_diagnosis import (
    ablation_effect,
    changed_rows,
    direct_logit,
    heavy_rows,
    overlap_vs_forgetting,
    reads_per_row,
    row_overlap,
    steps_to_learn,
    union_rows,
    weight_per_row,
    weight_share_on,
)

N = 8
# three tokens of a known-fact probe: (tokens, heads=1, k=2)
KNOWN_IDX = torch.tensor([[[0, 1]], [[0, 2]], [[3, 0]]])
KNOWN_W = torch.tensor([[[0.75, 0.25]], [[0.5, 0.5]], [[0.5, 0.5]]])


def test_changed_and_union_rows():
    before = torch.zeros(N, 3)
    after = before.clone()
    after[2, 1] = 1.0
    after[5] = -2.0
    assert changed_rows(before, after).tolist() == [2, 5]
    assert union_rows([torch.tensor([5, 1]), torch.tensor([1, 7]), torch.tensor([], dtype=torch.long)]).tolist() == [1, 5, 7]
    with pytest.raises(ValueError):
        changed_rows(before, torch.zeros(N, 4))


def test_weight_per_row_and_heavy_rows():
    w = weight_per_row(KNOWN_IDX, KNOWN_W, N)
    assert w.tolist() == [1.75, 0.25, 0.5, 0.5, 0, 0, 0, 0]  # sums to 3 tokens x 1 head
    assert reads_per_row(KNOWN_IDX, N).tolist() == [3, 1, 1, 1, 0, 0, 0, 0]
    assert heavy_rows(w, 0.5).tolist() == [0]  # row 0 alone carries 1.75 / 3 = 58%
    assert heavy_rows(w, 0.75).tolist() == [0, 2]  # 1.75 + 0.5 = 2.25 = 75% (ties: lower index first)
    assert heavy_rows(w, 1.0).tolist() == [0, 1, 2, 3]  # never an unread row


def test_overlap_and_weight_share():
    heavy = torch.tensor([0, 2])
    changed = torch.tensor([2, 5, 6])
    assert row_overlap(changed, heavy) == {"rows": 3, "reference": 2, "both": 1, "share_of_reference": 0.5}
    # weight on rows {2, 5, 6}: only row 2, 0.5 of 3
    assert weight_share_on(KNOWN_IDX, KNOWN_W, changed) == pytest.approx(0.5 / 3)
    assert weight_share_on(KNOWN_IDX, KNOWN_W, torch.tensor([0, 1, 2, 3])) == pytest.approx(1.0)


def test_overlap_vs_forgetting_splits_kept_and_lost_facts():
    changed = torch.tensor([0])
    lookups = [
        (torch.tensor([[0, 1]]), torch.tensor([[0.9, 0.1]])),  # 90% on changed row 0: lost
        (torch.tensor([[0, 4]]), torch.tensor([[0.5, 0.5]])),  # 50%: lost
        (torch.tensor([[5, 6]]), torch.tensor([[0.5, 0.5]])),  # 0%: kept
        (torch.tensor([[0, 7]]), torch.tensor([[0.2, 0.8]])),  # 20%: kept
        (torch.tensor([[0, 7]]), torch.tensor([[1.0, 0.0]])),  # not answered before: ignored
    ]
    out = overlap_vs_forgetting(lookups, [True, True, True, True, False], [False, False, True, True, False], changed)
    assert out["facts"] == 4 and out["lost"] == 2
    assert out["share_on_changed_lost"] == pytest.approx(0.7)
    assert out["share_on_changed_kept"] == pytest.approx(0.1)
    assert out["median_share"] == pytest.approx(0.2)  # torch's lower median of [0, .2, .5, .9]
    assert out["drop_above_median"] == 1.0 and out["drop_at_or_below_median"] == 0.0


def test_direct_logit_is_the_unembedded_normalised_memory_output():
    mem = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    resid = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # rms 3.536 and 1.414
    g = torch.tensor([2.0, 1.0])
    u = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    got = direct_logit(mem, resid, g, u, eps=0.0)
    assert got[0].item() == pytest.approx(2.0 / math.sqrt(12.5))
    assert got[1].item() == pytest.approx(-2.0 / math.sqrt(2.0))


def test_ablation_and_steps_to_learn():
    e = ablation_effect(torch.tensor([-1.0, -3.0]), torch.tensor([-4.0, -4.0]))
    assert e == {"mean_with": -2.0, "mean_without": -4.0, "mean_effect": 2.0, "n": 2}
    s = steps_to_learn([[False, True, True], [False, False, False], [True, True, True], [False, False, True]])
    assert s["learned_by_step"] == [0.25, 0.5, 0.75]
    assert s["mean_first_step"] == pytest.approx((2 + 1 + 3) / 3) and s["never"] == 1
