import math

import pytest
import torch

from pipeline.knn import FeatureBank, knn_scores


def test_knn_scores_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])  # cosine 1, 0, 1/√2
    scores = knn_scores(bank, labels, query, k=2, temperature=0.5)
    assert scores.shape == (1, 2)
    assert scores[0, 0].item() == pytest.approx(math.exp(1 / 0.5))  # nearest: bank row 0
    assert scores[0, 1].item() == pytest.approx(math.exp(2 ** -0.5 / 0.5))  # second: row 2 (row 1 is not among k)


def test_feature_bank_votes_its_nearest_label_and_is_empty_after_clear():
    bank = FeatureBank()
    bank.add(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), torch.tensor([2, 2]))
    bank.add(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    assert bank.scores(torch.tensor([[1.0, 0.05], [0.1, 1.0]]), k=1).argmax(dim=1).tolist() == [2, 0]
    bank.clear()
    with pytest.raises(RuntimeError, match="bank"):
        bank.scores(torch.ones(1, 2), k=1)
