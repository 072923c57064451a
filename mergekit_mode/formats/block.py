"""The sparse MoE block the output formats compute, over dense expert MLPs (torch modules).

Used where mergekit-mode runs the merged MoE itself, layer by layer (router training, `eval`):
the same numbers as the runtimes' own blocks. Softmax over all experts, keep the top k,
optionally rescale them to sum to 1, weighted sum of the chosen experts; formats with a shared
expert add sigmoid(gate . x) times the shared expert on every token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMlp(nn.Module):
    """One dense SwiGLU MLP, down(silu(gate(x)) * up(x)): an expert, or the shared expert (every
    base family here has this MLP)."""

    def __init__(self, hidden: int, intermediate: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()

        def weight(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)

        self.gate, self.up = weight(intermediate, hidden), weight(intermediate, hidden)
        self.down = weight(hidden, intermediate)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input."""
        return F.silu(F.linear(x, self.gate)) * F.linear(x, self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(x), self.down)

    def grad_dot(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """Per row, grad_out . forward(x), differentiable in x, without running the down projection
        forward: grad_out . down(h) = (down^T grad_out) . h, and down^T grad_out is what
        back-propagation through down computes anyway (here without autograd). Float32 [rows]."""
        with torch.no_grad():
            back = grad_out @ self.down
        return (self.hidden(x) * back).float().sum(-1)


class SparseMoeBlock(nn.Module):
    """The router and the shared expert's gate are plain tensors, so a trainer can put leaves that
    require grad in their place. `router_logits` keeps the last forward's logits [tokens, experts],
    float32 (for routing counts and the balancing loss)."""

    def __init__(self, router: torch.Tensor, experts: list[nn.Module], top_k: int, renormalise: bool,
                 shared: Optional[tuple[nn.Module, torch.Tensor]] = None) -> None:
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.renormalise = renormalise
        self.shared = shared[0] if shared else None
        self.shared_gate = shared[1] if shared else None
        self.router_logits: Optional[torch.Tensor] = None

    def _route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the top-k weights, in x's dtype; the top-k expert indices) per token."""
        self.router_logits = logits = flat.float() @ self.router.T.float()  # float32 whatever the compute dtype
        weights, index = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(flat.dtype), index

    def _shared_weight(self, flat: torch.Tensor) -> torch.Tensor:
        """sigmoid(gate . x) per token [tokens, 1], in x's dtype."""
        return torch.sigmoid(flat.float() @ self.shared_gate.T.float()).to(flat.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self._route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(index == e, as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared is not None:
            out = out + self._shared_weight(flat) * self.shared(flat)
        return out.reshape(x.shape)

    def grad_surrogate(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """A scalar whose gradient (with respect to x, the router and the shared gate) is the
        block's vector-Jacobian product with grad_out, i.e. sum(grad_out * forward(x)), without
        running any down projection forward (ExpertMlp.grad_dot)."""
        flat, gflat = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, x.shape[-1])
        weights, index = self._route(flat)
        total = torch.zeros((), device=x.device)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(index == e, as_tuple=True)
            if token.numel():
                total = total + (weights[token, slot].float() * expert.grad_dot(flat[token], gflat[token])).sum()
        if self.shared is not None:
            total = total + (self._shared_weight(flat)[:, 0].float() * self.shared.grad_dot(flat, gflat)).sum()
        return total
