"""Router weights: one [num_experts, hidden_size] matrix per layer, made before the write pass.

Routers are small (E x H per layer), so each mode computes all layers up front in float32; the
executor casts them as it writes. Random modes draw each expert's row of each layer from a
generator seeded by (seed, layer, expert name), so the same recipe gives the same bytes on every
run and machine, and an edit that adds or drops an expert leaves the other rows as they were. The
modes made from data (hidden, trained) run the base layer by layer over the experts' texts (see
layerwise.py); a hidden row depends only on its own expert's texts.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from tqdm import tqdm

from mergekit_mode.calibration import ExpertTexts, load_calibration, load_tokenizer
from mergekit_mode.inputs import TensorReader
from mergekit_mode.layerwise import Batch, FolderWeights, LayerStream, pack
from mergekit_mode.plan import BASE, Gates, Plan

# Rows of seq_len tokens per forward batch of the layer-streamed base.
STREAM_BATCH = 16


@dataclass(frozen=True)
class RouterContext:
    """How routers are computed: where (--device), in which dtype (--compute-dtype), and whether
    progress is shown."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    quiet: bool = False
    dtype: torch.dtype = torch.float32
    resident_bytes: Optional[int] = None  # of layers lm training keeps filled (None: layerwise.resident_budget)


# A mode's routers; a mode that also learns the shared expert's gates returns Gates.
RouterFn = Callable[[Plan, RouterContext], "list[torch.Tensor] | Gates"]


def _shape(plan: Plan) -> tuple[int, int, int]:
    cfg = plan.config
    return int(cfg["num_hidden_layers"]), plan.num_experts, int(cfg["hidden_size"])


def gateless(plan: Plan, ctx: RouterContext) -> list[torch.Tensor]:
    """Zero logits: softmax gives every expert 1/E, and with top-k = E nothing is dropped."""
    layers, experts, hidden = _shape(plan)
    return [torch.zeros(experts, hidden) for _ in range(layers)]


def normal_row(seed: int, layer: int, name: str, hidden: int) -> torch.Tensor:
    """Expert `name`'s row in `layer`: standard normal draws from a generator of its own, seeded by
    (seed, layer, name). A row depends on nothing else, so adding, dropping, replacing or reordering
    experts leaves every other expert's row as it was (what `edit` relies on)."""
    digest = hashlib.sha256(f"{seed}:{layer}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
    return torch.randn(hidden, generator=gen)


def _normal(plan: Plan, std: float) -> list[torch.Tensor]:
    layers, _, hidden = _shape(plan)
    seed, names = plan.recipe.recipe.router.seed, plan.recipe.recipe.expert_names
    return [torch.stack([normal_row(seed, layer, name, hidden) for name in names]) * std for layer in range(layers)]


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


def hidden_rows(plan: Plan, texts: list[ExpertTexts], pooling: str, ctx: RouterContext,
                experts: Optional[list[int]] = None) -> list[torch.Tensor]:
    """mergekit's hidden/hidden_avg at the real router input: per layer and expert, the mean over
    the expert's documents of the pooled post_attention_layernorm output of the base, minus the
    same mean over its negative prompts, L2-normalised.

    Rows of `experts` (default: all), [len(experts), hidden] per layer. Each expert's documents are
    batched apart from the others', so its row is the same bytes whichever experts are computed
    with it: `edit` computes only the rows an edit needs."""
    chosen = list(range(len(texts))) if experts is None else experts
    seq_len = plan.recipe.recipe.router.seq_len
    batches: list[Batch] = []
    owners: list[tuple[int, int]] = []  # (expert, +1 positive / -1 negative) per sequence
    for e in chosen:
        mine = texts[e].train + texts[e].negative
        batches += [replace(b, seq=b.seq + len(owners)) for b in pack(mine, seq_len, STREAM_BATCH)]
        owners += [(e, 1)] * len(texts[e].train) + [(e, -1)] * len(texts[e].negative)
    rows = []
    with TensorReader() as reader:
        weights = FolderWeights(plan.inputs[BASE], reader)
        stream = LayerStream(plan.inputs[BASE], weights, batches, ctx.device, ctx.dtype)
        hidden = stream.embed()
        for index in _layers(stream.num_layers, "hidden states", ctx):
            last = index == stream.num_layers - 1  # its output is never used
            hidden, pooled_batches = stream.run(stream.decoder_layer(index), hidden, mlp=not last,
                                                keep=lambda u, batch: _pool(u, batch, pooling))
            pooled = torch.empty(len(owners), stream.hidden_size)
            for p, b in zip(pooled_batches, batches):
                pooled[b.seq] = p
            rows.append(_signed_means(pooled, owners, chosen))
    return rows


def _signed_means(pooled: torch.Tensor, owners: list[tuple[int, int]], experts: list[int]) -> torch.Tensor:
    """Each expert's row: mean of its pooled documents minus the mean of its negatives, unit length."""
    row = torch.zeros(len(experts), pooled.shape[1])
    for i, e in enumerate(experts):
        for sign in (1, -1):
            picked = [k for k, owner in enumerate(owners) if owner == (e, sign)]
            if picked:
                row[i] += sign * pooled[picked].mean(0)
    return row / row.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _layers(count: int, desc: str, ctx: RouterContext):
    return tqdm(range(count), desc=desc, unit="layer", disable=ctx.quiet, leave=False)


def hidden(plan: Plan, ctx: RouterContext) -> list[torch.Tensor]:
    return hidden_rows(plan, calibration(plan), plan.recipe.recipe.router.pooling or "last", ctx)


def trained(plan: Plan, ctx: RouterContext) -> list[torch.Tensor] | Gates:
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


# Scale of the shared expert's initial gate row, relative to 1/sqrt(hidden_size): small, so the gate
# sigmoid(g . x) starts at 0.5 within about 1e-3 on every token, and not zero, because llama.cpp
# computes that sigmoid as silu(z) / z, which is 0/0 for an all-zero gate.
SHARED_GATE_SCALE = 1e-3


def shared_gates(plan: Plan) -> list[torch.Tensor]:
    """The shared expert's gate rows [1, hidden] per layer before any training (none without one)."""
    if plan.shared is None:
        return []
    layers, _, hidden = _shape(plan)
    gen = torch.Generator().manual_seed(zlib.crc32(f"shared-gate:{plan.recipe.recipe.router.seed}".encode()))
    return [torch.randn(1, hidden, generator=gen) * (SHARED_GATE_SCALE / hidden ** 0.5) for _ in range(layers)]


def as_gates(plan: Plan, made: "list[torch.Tensor] | Gates") -> Gates:
    """A mode's result with the shared expert's untrained gates where the mode made none."""
    return made if isinstance(made, Gates) else Gates(made, shared_gates(plan))


def make_routers(plan: Plan, ctx: RouterContext = RouterContext()) -> Gates:
    return as_gates(plan, ROUTERS[plan.recipe.recipe.router.mode](plan, ctx))
