"""k-nearest-neighbour accuracy of a module's features: the cheap per-epoch signal of a self-supervised run.

Wu et al. 2018's weighted vote: the k bank features most cosine-similar to a test sample's vote for their labels,
each with weight exp(similarity / τ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.1  # τ of the vote (Wu et al. use 0.07; 0.1 is the usual k-NN monitor's)


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, features: torch.Tensor, k: int,
               temperature: float = TEMPERATURE) -> torch.Tensor:
    """N×C class scores of `features` (N×D) by a weighted vote of their k nearest (cosine) bank rows; C is the largest
    bank label + 1 (a class absent from the bank cannot be predicted anyway)."""
    similarity = F.normalize(features.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    top, index = similarity.topk(min(k, bank.shape[0]), dim=1)
    # one-hot sums, not scatter_add_: the same bits on every run under deterministic algorithms on a GPU
    votes = F.one_hot(bank_labels[index], int(bank_labels.max()) + 1).float()
    return (votes * (top / temperature).exp()[..., None]).sum(dim=1)


class FeatureBank:
    """Features and labels of the bank images, gathered batch by batch before an evaluation, dropped after it."""

    def __init__(self) -> None:
        self.clear()

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features.append(features.float())
        self.labels.append(labels)
        self.whole = None

    def scores(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """The k-NN class scores of `features` against the bank (joined once, at the first test batch)."""
        if not self.features:
            raise RuntimeError("k-NN evaluation needs the bank's features first: send its batches before the test set")
        if self.whole is None:
            self.whole = torch.cat(self.features), torch.cat(self.labels)
        return knn_scores(*self.whole, features, k)

    def clear(self) -> None:
        self.features: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.whole: tuple[torch.Tensor, torch.Tensor] | None = None
