"""What a domain's own expert gets from the router, and the MoE run with the domain's expert forced.

Domain text whose name matches an expert's name (`eval --data code=...` on a MoE with an expert
named `code`) has a right answer for routing. Two measurements use it to split a MoE's loss to
its experts into its causes:

- the OWN WEIGHT of a token in a layer: the weight the layer's routing gives the domain's expert
  (after top-k and, where the format renormalises, renormalisation; 0 when the expert is not among
  the top k). 1.0 everywhere is the dense expert; a router that is right but soft leaves a share to
  other experts, a wrong one leaves 0.
- ORACLE ROUTING: the same MoE with each layer's choice forced from the label. `top1`: the domain's
  expert alone, weight 1 (the dense oracle: base stem + the expert's MLP). `topk`: the domain's
  expert plus the router's best k-1 others, with the router's own softmax weights over those k
  (renormalised where the format does): the trained weights without misrouting. So
  model -> oracle topk is what misrouting costs, oracle topk -> oracle top1 what soft mixing costs.

Both work on transformers' MoE blocks, which all call a router module `gate` returning
(logits, top-k weights, top-k indices): the measurements read or replace that triple with hooks,
so the forward itself is transformers' own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

OracleRouting = Literal["top1", "topk"]
ORACLE_ROUTINGS: tuple[str, ...] = ("top1", "topk")
# The own-weight histogram: BINS equal bins over [0, 1]; a weight of exactly 1 goes in the last.
BINS = 20


def router_modules(model: nn.Module) -> list[nn.Module]:
    """Each MoE layer's router, in layer order (the class transformers records router_logits from)."""
    recorder = getattr(model, "_can_record_outputs", {}).get("router_logits")
    target = getattr(recorder, "target_class", None)
    if target is None:
        return []
    return [m for m in model.modules() if isinstance(m, target)]


def forced_choice(logits: torch.Tensor, expert: int, top_k: int, renormalize: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [t, k], indices [t, k]) with `expert` first and the router's best k-1 others after it.

    Weights are the softmax over all experts at the chosen places, renormalised over the k if
    `renormalize`; with k = 1 the expert's weight is 1 (the dense oracle)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_k == 1:
        return torch.ones(len(logits), 1, dtype=probs.dtype), torch.full((len(logits), 1), expert)
    others = probs.clone()
    others[:, expert] = -1.0
    rest = others.topk(top_k - 1, dim=-1).indices
    indices = torch.cat([torch.full((len(logits), 1), expert), rest], dim=-1)
    weights = probs.gather(-1, indices)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices


@contextmanager
def oracle_routing(model: nn.Module, expert: int, how: OracleRouting) -> Iterator[None]:
    """Inside, every router of `model` routes each token by the label `expert` (see the module doc)."""
    routers = router_modules(model)
    if not routers:
        raise ValueError("oracle routing needs a Mixture-of-Experts model")
    top_k = 1 if how == "top1" else int(model.config.num_experts_per_tok)
    renormalize = bool(getattr(model.config, "norm_topk_prob", True))

    def force(_module, _inputs, output):
        logits = output[0]
        weights, indices = forced_choice(logits, expert, top_k, renormalize)
        return logits, weights.to(output[1].dtype).to(logits.device), indices.to(logits.device)

    hooks = [r.register_forward_hook(force) for r in routers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def recorded_choices(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Inside, each router's (top-k weights, top-k indices) of every forward is appended, on the
    CPU, in call order: one entry per layer per forward (after any oracle_routing hook, if that
    was entered first)."""
    routers = router_modules(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: seen.append((out[1].detach().float().cpu(),
                                                                        out[2].detach().cpu())))
             for r in routers]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def own_weight(weights: torch.Tensor, indices: torch.Tensor, expert: int) -> torch.Tensor:
    """[tokens]: the weight each token's routing gives `expert` (0 where it is not among the top k)."""
    return (weights * (indices == expert)).sum(-1)


@dataclass(frozen=True)
class OwnWeight:
    """Per layer, over a domain's tokens: the mean weight of its own expert, the share of tokens
    that do not choose it at all, and the histogram of the weight (BINS bins over [0, 1], shares)."""

    expert: str
    mean: list[float]
    not_chosen: list[float]
    histogram: list[list[float]]


class OwnWeightCounter:
    """Accumulates own_weight over batches, per layer."""

    def __init__(self, num_layers: int, expert: int) -> None:
        self.expert = expert
        self.total = torch.zeros(num_layers, dtype=torch.float64)
        self.zero = torch.zeros(num_layers, dtype=torch.float64)
        self.hist = torch.zeros(num_layers, BINS, dtype=torch.float64)
        self.tokens = 0

    def add(self, layer: int, weights: torch.Tensor, indices: torch.Tensor) -> None:
        """One layer's choices for some tokens (only the real ones: the caller drops padding)."""
        w = own_weight(weights, indices, self.expert).double()
        self.total[layer] += w.sum()
        self.zero[layer] += (w == 0).sum()
        self.hist[layer] += torch.bincount((w * BINS).long().clamp(max=BINS - 1), minlength=BINS).double()
        if layer == 0:
            self.tokens += len(w)

    def result(self, name: str) -> Optional[OwnWeight]:
        if self.tokens == 0:
            return None
        n = self.tokens
        return OwnWeight(name, (self.total / n).tolist(), (self.zero / n).tolist(), (self.hist / n).tolist())
