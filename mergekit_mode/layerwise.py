"""A dense base's stem run one decoder layer at a time over every calibration token.

mergekit's `hidden` mode loads the whole base model to take its hidden states, which runs out of
memory on large bases. Here each decoder layer is built from the config, its weights are read with
`TensorReader` (plain reads, nothing stays mapped), it runs over all batches, and it is dropped
before the next: peak memory is about one layer plus the activations of the calibration tokens
(hidden states and router inputs, tokens x hidden_size x 4 bytes each), whatever the depth.

The layer is transformers' own decoder layer of the base's family (`LlamaDecoderLayer`,
`Qwen3DecoderLayer`, ...), so the numbers are the full model's. Weights come from a `Weights`
source: `FolderWeights` reads a model folder (the base, for `hidden`), `PlanWeights` computes the
output's own tensors as the executor does (the stem as `stem:` makes it, and each expert's MLP),
so the merged MoE runs exactly as it will load. The router input of every output format is the
MLP input, i.e. the output of the layer's `post_attention_layernorm`, not the layer's input that
mergekit uses: it is captured with a forward hook on that norm. The output format's MoE block
(`OutputFormat.moe_block`) replaces the dense MLP, so the same loop runs the merged MoE layer by
layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from importlib import import_module
from typing import Callable, Optional

import torch
from torch import nn

from mergekit_mode.calibration import Sequence
from mergekit_mode.executor import compute_alone
from mergekit_mode.formats import families
from mergekit_mode.formats.families import BaseFamily
from mergekit_mode.inputs import ModelFolder, TensorReader
from mergekit_mode.plan import Plan

# A tensor by its checkpoint name, as float32 (e.g. "model.layers.0.self_attn.q_proj.weight").
Weights = Callable[[str], torch.Tensor]


class FolderWeights:
    """A model folder's own tensors (the dense base, MLP included)."""

    def __init__(self, folder: ModelFolder, reader: TensorReader) -> None:
        self.folder, self.reader = folder, reader

    def __call__(self, name: str) -> torch.Tensor:
        return self.reader.read(self.folder.tensors[name]).to(torch.float32)


class PlanWeights:
    """The output's tensors, computed on demand exactly as the executor computes them for writing."""

    def __init__(self, plan: Plan, reader: TensorReader, device: torch.device) -> None:
        self.plan, self.reader, self.device = plan, reader, device
        self.items = {t.name: t for t in plan.tensors}

    def __call__(self, name: str) -> torch.Tensor:
        return compute_alone(replace(self.items[name], dtype=torch.float32), self.plan, self.reader, self.device)


def stem_config(base: ModelFolder):
    """The base's transformers config (of its family's class), with SDPA attention."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**base.config)
    config._attn_implementation = "sdpa"
    return config


def _class(family: BaseFamily, model_type: str, suffix: str) -> type:
    module = import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, f"{family.transformers_prefix}{suffix}")


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids [b, L] and each row's true length. Right padding needs no mask: a
    causal layer never lets a real token see the padding after it."""

    ids: torch.Tensor
    lengths: torch.Tensor

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """The real (unpadded) tokens of a [b, L, ...] tensor, flattened to [tokens, ...]."""
        mask = torch.arange(x.shape[1])[None, :] < self.lengths[:, None]
        return x[mask]


def make_batches(sequences: list[Sequence], batch_size: int, pad_id: int = 0) -> list[Batch]:
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        batches.append(Batch(ids, torch.tensor([len(s) for s in chunk])))
    return batches


def load_params(module: nn.Module, weights: Weights, names: dict[str, str]) -> None:
    """Fill `module`'s parameters: names maps each parameter name to its checkpoint tensor name."""
    with torch.no_grad():
        params = dict(module.named_parameters())
        for param, tensor in names.items():
            params[param].copy_(weights(tensor))


class LayerStream:
    """A dense base's stack, layer by layer, over a fixed list of token batches."""

    def __init__(self, base: ModelFolder, weights: Weights, batches: list[Batch], device: torch.device) -> None:
        self.model_type = base.model_type  # the architecture and config are the base's
        self.family = families.family_of(base.config, "base_model")
        self.weights = weights
        self.batches = batches
        self.device = device
        self.config = stem_config(base)
        self.num_layers = int(self.config.num_hidden_layers)
        rotary = _class(self.family, self.model_type, "RotaryEmbedding")(self.config).to(device)
        self._rope = [rotary(torch.zeros(1, device=device), self._positions(b)) for b in batches]
        masks = import_module("transformers.masking_utils")
        sliding = getattr(self.config, "sliding_window", None) is not None
        self._mask_fn = masks.create_sliding_window_causal_mask if sliding else masks.create_causal_mask

    def _positions(self, batch: Batch) -> torch.Tensor:
        return torch.arange(batch.ids.shape[1], device=self.device)[None]

    def embed(self) -> list[torch.Tensor]:
        """Layer 0's input per batch: embedding rows of the ids (kept on the CPU between layers)."""
        table = self.weights(families.EMBED.name).cpu()
        return [table[b.ids] for b in self.batches]

    def decoder_layer(self, index: int, mlp: Optional[nn.Module] = None) -> nn.Module:
        """Decoder layer `index`; with `mlp`, its dense MLP replaced by that module (whose weights
        the caller has loaded), else the dense MLP read from the weights too."""
        layer = self._empty("DecoderLayer", index)
        if mlp is not None:
            layer.mlp = mlp.to(self.device)
        prefix = f"{families.LAYER_PREFIX}{index}."
        names = {n: prefix + n for n, _ in layer.named_parameters() if mlp is None or not n.startswith("mlp.")}
        load_params(layer, self.weights, names)
        return layer.eval()

    def moe(self, plan: Plan, index: int, router: torch.Tensor, shared_gate: Optional[torch.Tensor] = None) -> nn.Module:
        """Layer `index`'s MoE block of the plan's output (its format's block over its experts'
        MLPs, and its shared expert with this gate row if it has one), with this router."""
        fmt = plan.format
        experts = [self._mlp({role: fmt.expert_tensor(index, e, role) for role in fmt.experts})
                   for e in range(plan.num_experts)]
        shared = None
        if plan.shared is not None:
            assert shared_gate is not None, f"{fmt.name} has a shared expert: give its gate"
            names = {role: fmt.shared_expert_tensor(index, role) for role in fmt.experts}
            shared = (self._mlp(names, plan.shared.intermediate_size), shared_gate)
        return fmt.moe_block(router, experts, plan.top_k, shared)

    def _mlp(self, names: dict[families.Role, str], intermediate_size: Optional[int] = None) -> nn.Module:
        """The family's dense MLP with the weights named per role (an expert's, the shared expert's)."""
        config = self.config
        if intermediate_size is not None:
            config = copy.copy(config)
            config.intermediate_size = intermediate_size
        mlp = self._empty("MLP", config=config)
        load_params(mlp, self.weights, {self.family.mlp(role).name.removeprefix("mlp."): tensor
                                        for role, tensor in names.items()})
        return mlp

    def _empty(self, suffix: str, *args: int, config=None) -> nn.Module:
        """A transformers module with uninitialised parameters on the device: every one is loaded
        next, and a random init of a large layer costs seconds on a CPU."""
        with torch.device("meta"):
            module = _class(self.family, self.model_type, suffix)(config or self.config, *args)
        # buffers would stay uninitialised: none exist in these modules (rotary is model-level)
        assert not list(module.buffers()), f"{suffix} has buffers"
        return module.to_empty(device=self.device)

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(next hidden states, router inputs) per batch: the layer's outputs and the outputs of
        its post_attention_layernorm, both on the CPU in float32."""
        captured: list[torch.Tensor] = []
        hook = layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _i, out: captured.append(out.detach().float().cpu())
        )
        try:
            out = []
            for h, rope, batch in zip(hidden, self._rope, self.batches):
                x = h.to(self.device)
                positions = self._positions(batch)
                mask = self._mask_fn(config=self.config, inputs_embeds=x, attention_mask=None, cache=None,
                                     position_ids=positions)
                y = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
                out.append(y.float().cpu())
        finally:
            hook.remove()
        return out, captured
