"""The two AutoDeco heads and the distribution features the top-p head reads.

Tensor names follow the published checkpoints: ``mlp.0`` and ``mlp.2`` are the two Linear
layers (``mlp.1`` is the ReLU); the output squashing (2·sigmoid, sigmoid) is applied outside
the Sequential so it carries no weights.

This file is copied next to ``config.json`` by ``save_pretrained`` so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without this
package installed: keep its imports to torch and relative imports only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .nucleus import LogitStats, logit_stats

N_FEATURES = 4  # max prob, entropy, variance of the probabilities, top-5 mass


def features_from_stats(stats: LogitStats) -> torch.Tensor:
    """[N, 4] features of softmax(z) from precomputed row statistics (no extra vocab pass)."""
    vocab = stats.vocab_size
    max_prob = torch.exp(stats.top_values[:, 0] - stats.lse)
    top5 = torch.exp(stats.top_values[:, :5] - stats.lse[:, None]).sum(-1)
    entropy = stats.entropy
    # torch.var's unbiased estimator over the vocabulary: (sum p^2 - (sum p)^2 / V) / (V - 1).
    variance = (stats.sum_p2 - 1.0 / vocab) / max(vocab - 1, 1)
    return torch.stack([max_prob, entropy, variance, top5], dim=-1)


def distribution_features(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Features of softmax(logits / T): [..., 4] = (max prob, entropy, variance, top-5 mass).

    ``logits`` is [..., V], ``temperature`` is [...] (or [..., 1]). Computed in float32, with the
    training features' arithmetic (``heads.model.block_features``; decoding's native statistics
    agree to float32 rounding).
    """
    lead = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1]).float() / temperature.reshape(-1, 1).float()
    return features_from_stats(logit_stats(z, k=5, fast=False)).reshape(*lead, N_FEATURES)


class TempHead(nn.Module):
    """h_t -> T_t in (0, 2): Linear(H, width) - ReLU - Linear(width, 1), then 2·sigmoid."""

    def __init__(self, hidden_size: int, width: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [...]"""
        x = hidden.to(self.mlp[0].weight)
        return 2.0 * torch.sigmoid(self.mlp(x)).squeeze(-1)


class TopPHead(nn.Module):
    """(h_t, T_t[, features]) -> P_t in (0, 1): Linear(H + 1 [+ 4], width) - ReLU - Linear(width, 1), sigmoid."""

    def __init__(self, hidden_size: int, width: int = 256, use_enhanced_features: bool = True):
        super().__init__()
        self.use_enhanced_features = use_enhanced_features
        n_in = hidden_size + 1 + (N_FEATURES if use_enhanced_features else 0)
        self.mlp = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(
        self, hidden: torch.Tensor, temperature: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden [..., H], temperature [...], features [..., 4] (needed when enhanced) -> [...]"""
        weight = self.mlp[0].weight
        parts = [hidden.to(weight), temperature.to(weight).unsqueeze(-1)]
        if self.use_enhanced_features:
            if features is None:
                raise ValueError("TopPHead(use_enhanced_features=True) needs the distribution features")
            parts.append(features.to(weight))
        return torch.sigmoid(self.mlp(torch.cat(parts, dim=-1))).squeeze(-1)
