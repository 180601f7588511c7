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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BPFREE_METHODS = ("fa", "dfa", "drtp")  # baselines whose hidden layers learn from a fed-back signal
NEEDS_OUTPUT_ERROR = ("fa", "dfa")  # need the same batch's output error: sequential schedule only


def random_feedback(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A fixed rows×cols Gaussian matrix with entries of variance 1/cols, drawn from its own seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) / cols**0.5


def output_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """e = ∂ mean-CE / ∂logits = (softmax − onehot) / N: the error DFA projects to every layer."""
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return (logits.softmax(dim=1) - onehot) / logits.shape[0]


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
