"""evaluate.py's metrics against hand-computed values."""

import math

import torch

from evaluate import hit_at_1, ndcg_at_k
from runtime import info_nce, retrieval_logprob


def test_hit_at_1_counts_a_tie_with_the_gold_as_a_miss():
    assert hit_at_1(torch.tensor([0.9, 0.1, 0.3])) == 1.0
    assert hit_at_1(torch.tensor([0.3, 0.1, 0.9])) == 0.0
    assert hit_at_1(torch.tensor([0.5, 0.5, 0.1])) == 0.0  # a constant model must not score 100 %
    assert hit_at_1(torch.zeros(10)) == 0.0


def test_ndcg_at_5_linear_gain():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.0, -1.0])
    rel = torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0, 1.0])  # relevant docs ranked 2nd and 6th (outside the top 5)
    dcg = 2 / math.log2(3)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    assert abs(ndcg_at_k(scores, rel) - dcg / ideal) < 1e-6
    assert ndcg_at_k(scores, torch.zeros(6)) == 0.0


def test_info_nce_masks_duplicated_targets_but_keeps_the_positive():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    t = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    pos = torch.tensor([0, 1])
    same = torch.tensor([[True, True, False], [True, True, False]])  # columns 0 and 1 are the same answer
    masked = info_nce(q, t, pos, same, tau=0.1)
    unmasked = info_nce(q, t, pos, torch.zeros_like(same), tau=0.1)
    assert masked < 1e-3 < unmasked  # without the mask each query fights its own answer's duplicate


def test_retrieval_reward_prefers_the_embedding_that_points_at_its_positive():
    cache = torch.eye(4)
    right, wrong = cache[2], cache[1]
    r = retrieval_logprob(torch.stack([right, wrong]), cache, torch.tensor([2, 2]), tau=0.1)
    assert r[0] > r[1] and r[0] <= 0
