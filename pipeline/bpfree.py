"""The BP-free baselines' learning signals (Table 4): pure tensor math, no modules, optimizers or I/O.

Each hidden layer l of a layer-per-module network is updated as if `signal_l` were the
gradient of the loss w.r.t. its output h_l: its parameters get ∂<h_l, signal_l>/∂θ_l, which
is one layer's own backward (through its nonlinearity), never more.

- FA (Lillicrap 2016): signal_l = δz_{l+1} B_{l+1}, where δz_{l+1} is layer l+1's signal taken back
  through its own nonlinearity to its pre-activation z_{l+1} = W_{l+1} h_l + b (for a plain
  ReLU layer δz = signal_{l+1} ⊙ relu'(z)), and B_{l+1}, a fixed random matrix of W_{l+1}'s shape,
  stands in for W_{l+1} in the backward pass.
- DFA (Nøkland 2016): signal_l = e B_l, the output error e = ∂L/∂logits sent straight to layer l.
- DRTP (Frenkel 2021): signal_l = −onehot(y) B_l / N, the target in place of the error
  (e ≈ −onehot at the label), so layer l needs only its input and the label.
- PEPITA (Dellaferrera & Kreiman 2022): no backward signal at all. A clean forward gives the output
  error e = softmax − onehot (per sample); a second forward runs on x + e F, F a fixed random C×D_in
  matrix; hidden layer l's signal is (h_l − h_l^mod) / N, the last layer's its loss gradient, and each
  enters at the layer's pre-activation of the modulated pass, so W_l moves by signalᵀ h_{l-1}^mod
  (PEPITA's rule: no derivative of the nonlinearity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BPFREE_METHODS = ("fa", "dfa", "drtp", "pepita")  # baselines whose hidden layers learn from a fed-back signal
NEEDS_OUTPUT_ERROR = ("fa", "dfa", "pepita")  # need the same batch's output error: sequential schedule only
PEPITA_SCALE = 0.05  # F's entries: uniform in ±0.05·√(6 / D_in), as we read the PEPITA paper's CIFAR-10 setting


def random_feedback(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A fixed rows×cols Gaussian matrix with entries of variance 1/cols, drawn from its own seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) / cols**0.5


def pepita_feedback(rows: int, cols: int, seed: int) -> torch.Tensor:
    """PEPITA's fixed rows×cols projection F of the output error onto the input: uniform in ±0.05·√(6 / cols)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, cols, generator=g) * 2 - 1) * PEPITA_SCALE * (6 / cols) ** 0.5


def prediction_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """softmax − onehot, per sample (N×C)."""
    return logits.softmax(dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)


def output_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """e = ∂ mean-CE / ∂logits = (softmax − onehot) / N: the error DFA projects to every layer."""
    return prediction_error(logits, y) / logits.shape[0]


def fa_signal(pre_signal_next: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """FA: the signal at h_l from δz_{l+1} (N×out) at layer l+1's pre-activation, with B_{l+1} (out×in) for W_{l+1}."""
    return pre_signal_next @ feedback


def dfa_signal(error: torch.Tensor, feedback: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """DFA: the output error (N×C) projected by B_l (C×D) to layer l's output shape."""
    return (error @ feedback).reshape(shape)


def drtp_signal(y: torch.Tensor, feedback: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """DRTP: −onehot(y) / N (N×C) projected by B_l (C×D) to layer l's output shape."""
    onehot = F.one_hot(y, feedback.shape[0]).to(feedback.dtype)
    return (-onehot / y.shape[0] @ feedback).reshape(shape)


def pepita_input(x: torch.Tensor, error: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """PEPITA's modulated input: x + e F, the per-sample error (N×C) projected by F (C×D_in) to x's shape."""
    return x + (error @ feedback).reshape(x.shape)


def pepita_signal(clean: torch.Tensor, modulated: torch.Tensor) -> torch.Tensor:
    """PEPITA's signal for a hidden layer: (h − h^mod) / N, the two forward passes' difference."""
    return (clean - modulated) / clean.shape[0]
