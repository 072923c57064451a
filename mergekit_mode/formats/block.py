"""The sparse MoE block the output formats compute, over dense expert MLPs (a torch module).

Used where mergekit-mode runs the merged MoE itself, layer by layer (router training): the same
numbers as the runtimes' own blocks. Softmax over all experts, keep the top k, optionally rescale
them to sum to 1, weighted sum of the chosen experts; formats with a shared expert add
sigmoid(gate . x) times the shared expert on every token.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class SparseMoeBlock(nn.Module):
    def __init__(self, router: torch.Tensor, experts: list[nn.Module], top_k: int, renormalise: bool,
                 shared: Optional[tuple[nn.Module, torch.Tensor]] = None) -> None:
        super().__init__()
        self.router = nn.Parameter(router, requires_grad=False)
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.renormalise = renormalise
        self.shared = shared[0] if shared else None
        self.shared_gate = nn.Parameter(shared[1], requires_grad=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax((flat @ self.router.T).float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(index == e, as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared is not None:
            out = out + torch.sigmoid(flat @ self.shared_gate.T) * self.shared(flat)
        return out.reshape(x.shape)
