"""What an output format is: a MoE checkpoint layout that transformers, llama.cpp and vLLM load.

A format says which base families it takes, where each role of a dense base goes in the output
(expert projections, router, shared expert and its gate; embeddings, attention, norms and lm_head
keep the family's names), the config.json it writes, how a config states the expert count and
top-k, and the MoE block it computes, which the layer-streamed routers and `eval` run. Everything
else asks the plan's format. A new format is one module with a subclass and one line in the
registry (`mergekit_mode.formats`), like a llama.cpp converter class.

Torch-free at import: the recipe and `validate` read formats; only `moe_block` needs torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from mergekit_mode.formats.families import BaseFamily, Role

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class SharedExpert:
    """The shared expert of a format that has one, as the plan decided it: the block adds
    sigmoid(gate . x) * shared_mlp(x) to the routed mixture on every token."""

    intermediate_size: int


class OutputFormat(ABC):
    name: ClassVar[str]  # recipe value of output.architecture (the output's model_type)
    title: ClassVar[str]  # for people (model card, messages)
    architecture: ClassVar[str]  # config.json architectures[0], the transformers class
    families: ClassVar[tuple[str, ...]]  # base families it takes; the first format listing one is its default
    experts_key: ClassVar[str]  # config key of the expert count
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    renormalise: ClassVar[bool]  # whether the block rescales the top-k weights to sum to 1
    # Where roles go: MLP role -> tensor name template ({layer}, {expert}), in the order written.
    experts: ClassVar[dict[Role, str]]
    router: ClassVar[str]  # {layer}
    # Formats with a shared expert: MLP role -> template ({layer}), and its gate's template.
    shared_expert: ClassVar[Optional[dict[Role, str]]] = None
    shared_expert_gate: ClassVar[Optional[str]] = None
    empty_shared_expert_size: ClassVar[int] = 0  # intermediate size of an unused (all-zero) shared expert
    ties_embeddings: ClassVar[bool] = True  # False: a tied base's lm_head is written as a copy of embed_tokens

    def expert_tensor(self, layer: int, expert: int, role: Role) -> str:
        return self.experts[role].format(layer=layer, expert=expert)

    def router_tensor(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def shared_expert_tensor(self, layer: int, role: Role) -> str:
        assert self.shared_expert is not None, f"{self.name} has no shared expert"
        return self.shared_expert[role].format(layer=layer)

    def shared_gate_tensor(self, layer: int) -> str:
        assert self.shared_expert_gate is not None, f"{self.name} has no shared expert"
        return self.shared_expert_gate.format(layer=layer)

    def takes(self, family: BaseFamily) -> bool:
        return family.name in self.families

    def num_experts(self, config: Any) -> int:
        """Expert count of a config of this format (a config.json dict or a transformers config)."""
        return int(_get(config, self.experts_key))

    def top_k(self, config: Any) -> int:
        return int(_get(config, self.top_k_key))

    def build_config(self, base_config: dict, num_experts: int, top_k: int, dtype: str,
                     shared: Optional[SharedExpert]) -> dict:
        """config.json of the output. Written by us, key-sorted, so the bytes don't depend on the
        installed transformers version."""
        config = copied_config(base_config)
        config.update(
            architectures=[self.architecture],
            model_type=self.name,
            hidden_act="silu",
            output_router_logits=False,
            router_aux_loss_coef=0.001,
            use_cache=True,
            dtype=dtype,
            torch_dtype=dtype,
        )
        config.update({self.experts_key: num_experts, self.top_k_key: top_k})
        config.update(self.format_config(base_config, shared))
        return dict(sorted(config.items()))

    @abstractmethod
    def format_config(self, base_config: dict, shared: Optional[SharedExpert]) -> dict:
        """The config keys of this format beyond the base's and the expert count and top-k."""

    def moe_block(self, router: Any, experts: list[nn.Module], top_k: int,
                  shared: Optional[tuple[nn.Module, Any]] = None) -> nn.Module:
        """This format's MoE block over dense expert MLPs, as the runtimes compute it; `shared`:
        (shared expert MLP, its gate row [1, hidden]) for formats that have one."""
        from mergekit_mode.formats.block import SparseMoeBlock

        return SparseMoeBlock(router, experts, top_k, self.renormalise, shared)

    def model_class(self) -> type:
        """The transformers class that loads this format."""
        import transformers

        return getattr(transformers, self.architecture)


def _get(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, dict) else getattr(config, key)


# Config keys taken over from the base as they are (when present): everything that shapes the
# attention stem and the tokenizer interface; the MLP keys are re-stated for the experts.
COPIED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "initializer_range",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "rope_scaling", "rope_parameters",
)


def rope_theta(base_config: dict) -> float:
    """The base's rope theta, wherever its transformers version put it (default 1e4, Llama's)."""
    if "rope_theta" in base_config:
        return float(base_config["rope_theta"])
    params = base_config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return 10000.0


def copied_config(base_config: dict) -> dict:
    """The base's keys that every format copies, with rope stated explicitly: MoE classes have
    defaults of their own (a MoE class's rope theta may not be the base's), so nothing is left to them."""
    config = {k: base_config[k] for k in COPIED_KEYS if k in base_config}
    theta = rope_theta(base_config)
    config["rope_theta"] = theta
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        config["rope_parameters"] = {**params, "rope_theta": theta}
    elif "rope_scaling" not in config:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return config
