"""Router weights: one [num_experts, hidden_size] matrix per layer, made before the write pass.

Routers are small (E x H per layer), so each mode computes all layers up front in float32; the
executor casts them as it writes. Random modes draw from one seeded generator in layer order, so
the same recipe gives the same bytes on every run and machine. The modes made from data (hidden,
trained) run the base layer by layer over the experts' texts (see layerwise.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from mergekit_mode.calibration import ExpertTexts, Sequence, load_calibration, load_tokenizer
from mergekit_mode.inputs import TensorReader
from mergekit_mode.layerwise import Batch, FolderWeights, LayerStream, pack
from mergekit_mode.plan import BASE, Plan

# Rows of seq_len tokens per forward batch of the layer-streamed base.
STREAM_BATCH = 16


@dataclass(frozen=True)
class RouterContext:
    """How routers are computed: where (--device), in which dtype (--compute-dtype), and whether
    progress is shown."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    quiet: bool = False
    dtype: torch.dtype = torch.float32


RouterFn = Callable[[Plan, RouterContext], list[torch.Tensor]]


def _shape(plan: Plan) -> tuple[int, int, int]:
    cfg = plan.config
    return int(cfg["num_hidden_layers"]), int(cfg["num_local_experts"]), int(cfg["hidden_size"])


def gateless(plan: Plan, ctx: RouterContext) -> list[torch.Tensor]:
    """Zero logits: softmax gives every expert 1/E, and with top-k = E nothing is dropped."""
    layers, experts, hidden = _shape(plan)
    return [torch.zeros(experts, hidden) for _ in range(layers)]


def _normal(plan: Plan, std: float) -> list[torch.Tensor]:
    layers, experts, hidden = _shape(plan)
    gen = torch.Generator().manual_seed(plan.recipe.recipe.router.seed)
    return [torch.randn(experts, hidden, generator=gen) * std for _ in range(layers)]


def noisy(plan: Plan, ctx: RouterContext) -> list[torch.Tensor]:
    """The paper's noisy router: small Gaussian logits, so top-k picks vary by token but no expert
    dominates. Default std is the base's initializer_range, the scale a freshly made layer has."""
    std = plan.recipe.recipe.router.std or float(plan.inputs[BASE].config.get("initializer_range", 0.02))
    return _normal(plan, std)


def random(plan: Plan, ctx: RouterContext) -> list[torch.Tensor]:
    """mergekit-moe's `random` gate mode: standard normal rows."""
    return _normal(plan, 1.0)


def calibration(plan: Plan, held_out: float = 0.0) -> list[ExpertTexts]:
    """The experts' texts tokenized with the base's tokenizer."""
    base = plan.inputs[BASE]
    return load_calibration(plan.recipe, load_tokenizer(base.path, "base_model"), held_out)


def _pool(router_inputs: torch.Tensor, batch: Batch, pooling: str) -> torch.Tensor:
    """[rows, width, H] -> [sequences, H]: each sequence's last token, or its mean over its tokens."""
    return batch.last(router_inputs) if pooling == "last" else batch.mean(router_inputs)


def hidden_rows(plan: Plan, texts: list[ExpertTexts], pooling: str, ctx: RouterContext) -> list[torch.Tensor]:
    """mergekit's hidden/hidden_avg at the real router input: per layer and expert, the mean over
    the expert's documents of the pooled post_attention_layernorm output of the base, minus the
    same mean over its negative prompts, L2-normalised."""
    sequences: list[Sequence] = []
    owners: list[tuple[int, int]] = []  # (expert, +1 positive / -1 negative) per sequence
    for e, t in enumerate(texts):
        sequences += t.train + t.negative
        owners += [(e, 1)] * len(t.train) + [(e, -1)] * len(t.negative)
    num_experts = len(texts)
    rows = []
    seq_len = plan.recipe.recipe.router.seq_len
    with TensorReader() as reader:
        weights = FolderWeights(plan.inputs[BASE], reader)
        stream = LayerStream(plan.inputs[BASE], weights, pack(sequences, seq_len, STREAM_BATCH), ctx.device, ctx.dtype)
        hidden = stream.embed()
        for index in _layers(stream.num_layers, "hidden states", ctx):
            hidden, router_inputs = stream.run(stream.decoder_layer(index), hidden)
            pooled = torch.empty(len(sequences), stream.hidden_size)
            for r, b in zip(router_inputs, stream.batches):
                pooled[b.seq] = _pool(r, b, pooling)
            rows.append(_signed_means(pooled, owners, num_experts))
    return rows


def _signed_means(pooled: torch.Tensor, owners: list[tuple[int, int]], num_experts: int) -> torch.Tensor:
    row = torch.zeros(num_experts, pooled.shape[1])
    for e in range(num_experts):
        for sign in (1, -1):
            picked = [i for i, owner in enumerate(owners) if owner == (e, sign)]
            if picked:
                row[e] += sign * pooled[picked].mean(0)
    return row / row.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _layers(count: int, desc: str, ctx: RouterContext):
    return tqdm(range(count), desc=desc, unit="layer", disable=ctx.quiet, leave=False)


def hidden(plan: Plan, ctx: RouterContext) -> list[torch.Tensor]:
    return hidden_rows(plan, calibration(plan), plan.recipe.recipe.router.pooling or "last", ctx)


def trained(plan: Plan, ctx: RouterContext) -> list[torch.Tensor]:
    """Routers trained on the experts' data (router.train), from the hidden rows or zeros."""
    from mergekit_mode import router_training

    spec = plan.recipe.recipe.router
    train = spec.training
    texts = calibration(plan, train.held_out)
    init = gateless(plan, ctx) if train.init == "zeros" else hidden_rows(plan, texts, spec.pooling or "last", ctx)
    if train.init == "domain":
        init = router_training.train_domain(plan, texts, init, ctx)
    objective = router_training.train_domain if train.objective == "domain" else router_training.train_lm
    return objective(plan, texts, init, ctx)


ROUTERS: dict[str, RouterFn] = {
    "gateless": gateless, "noisy": noisy, "random": random, "hidden": hidden, "trained": trained,
}


def make_routers(plan: Plan, ctx: RouterContext = RouterContext()) -> list[torch.Tensor]:
    return ROUTERS[plan.recipe.recipe.router.mode](plan, ctx)
