"""Router weights: one [num_experts, hidden_size] matrix per layer, made before the write pass.

Routers are small (E x H per layer), so each mode computes all layers up front in float32; the
executor casts them as it writes. Random modes draw from one seeded generator in layer order, so
the same recipe gives the same bytes on every run and machine.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergekit_mode.plan import BASE, Plan

RouterFn = Callable[[Plan], list[torch.Tensor]]


def _shape(plan: Plan) -> tuple[int, int, int]:
    cfg = plan.config
    return int(cfg["num_hidden_layers"]), int(cfg["num_local_experts"]), int(cfg["hidden_size"])


def gateless(plan: Plan) -> list[torch.Tensor]:
    """Zero logits: softmax gives every expert 1/E, and with top-k = E nothing is dropped."""
    layers, experts, hidden = _shape(plan)
    return [torch.zeros(experts, hidden) for _ in range(layers)]


def _normal(plan: Plan, std: float) -> list[torch.Tensor]:
    layers, experts, hidden = _shape(plan)
    gen = torch.Generator().manual_seed(plan.recipe.recipe.router.seed)
    return [torch.randn(experts, hidden, generator=gen) * std for _ in range(layers)]


def noisy(plan: Plan) -> list[torch.Tensor]:
    """The paper's noisy router: small Gaussian logits, so top-k picks vary by token but no expert
    dominates. Default std is the base's initializer_range, the scale a freshly made layer has."""
    std = plan.recipe.recipe.router.std or float(plan.inputs[BASE].config.get("initializer_range", 0.02))
    return _normal(plan, std)


def random(plan: Plan) -> list[torch.Tensor]:
    """mergekit-moe's `random` gate mode: standard normal rows."""
    return _normal(plan, 1.0)


ROUTERS: dict[str, RouterFn] = {"gateless": gateless, "noisy": noisy, "random": random}


def make_routers(plan: Plan) -> list[torch.Tensor]:
    return ROUTERS[plan.recipe.recipe.router.mode](plan)
