"""Base families as data: the dense checkpoints mergekit-mode takes, tensor by tensor.

A family lists every tensor of its checkpoint with its role (what a MoE does with it) and its
shape in terms of the config, plus the config values it needs (no biases where it has none, silu
MLPs). The planner walks these rows; output formats say where each role goes. Adding a family that
an existing format can express is one entry here, in the spirit of gguf-py's tensor_mapping.py
(names as data, not code). Bases no format can express are named with what they lack, so the
refusal says why instead of "unsupported".

Torch-free: the recipe, `validate` and the formats' registry read this without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mergekit_mode.errors import ModeError


class Role(str, Enum):
    """What a dense base tensor is, and so what a MoE does with it."""

    EMBED = "embed"  # token embeddings: shared, by the `embeddings` policy
    ATTENTION = "attention"  # q/k/v/o weights, their biases, q/k norms: the shared stem
    NORM = "norm"  # input/post-attention layer norms and the final norm: shared stem
    GATE_PROJ = "gate_proj"  # the MLP, which becomes one expert per input
    UP_PROJ = "up_proj"
    DOWN_PROJ = "down_proj"
    LM_HEAD = "lm_head"  # shared, by the `embeddings` policy (absent when tied)


MLP_ROLES = (Role.GATE_PROJ, Role.UP_PROJ, Role.DOWN_PROJ)


@dataclass(frozen=True)
class Tensor:
    """One tensor of a dense checkpoint: its name (within a layer for layer tensors), role and shape
    as config dimensions (see `dims`)."""

    name: str
    role: Role
    shape: tuple[str, ...]


@dataclass(frozen=True)
class BaseFamily:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values of this family
    transformers_prefix: str  # class prefix of its transformers modules (LlamaDecoderLayer, ...)
    features: str  # what sets its stem apart, for messages ("q/k/v biases")
    layer: tuple[Tensor, ...]  # per decoder layer, in checkpoint order
    # config key -> (values it may take, why): what the rows above assume
    requires: tuple[tuple[str, tuple[object, ...], str], ...]
    needs: tuple[str, ...] = ()  # config keys that must be stated (no default that dims() could assume)

    def layer_name(self, layer: int, tensor: Tensor) -> str:
        return f"{LAYER_PREFIX}{layer}.{tensor.name}"

    def mlp(self, role: Role) -> Tensor:
        return next(t for t in self.layer if t.role == role)

    def check(self, config: dict, field: str) -> None:
        """Refuse configs whose stem the rows above do not describe, instead of dropping weights."""
        for key in self.needs:
            if key not in config:
                raise ModeError(f"{field}: config.json lacks {key}, which {self.name} models state")
        for key, allowed, why in self.requires:
            value = config.get(key)
            if value not in allowed:
                raise ModeError(f"{field}: {key} is {value!r}; {why}")
        params = config.get("rope_parameters") or {}
        if isinstance(params, dict) and params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModeError(f"{field}: partial_rotary_factor is not supported (rotary on every head dimension only)")


LAYER_PREFIX = "model.layers."
# Outside the layers: the same names in every family here (transformers' decoder-only layout).
EMBED = Tensor("model.embed_tokens.weight", Role.EMBED, ("vocab", "hidden"))
FINAL_NORM = Tensor("model.norm.weight", Role.NORM, ("hidden",))
LM_HEAD = Tensor("lm_head.weight", Role.LM_HEAD, ("vocab", "hidden"))
# Tensors a dense checkpoint may carry that hold no weights (old transformers saved rotary buffers).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def _attention(biases: bool = False, qk_norm: bool = False) -> tuple[Tensor, ...]:
    rows = [Tensor("input_layernorm.weight", Role.NORM, ("hidden",))]
    for proj, out in (("q", "q"), ("k", "kv"), ("v", "kv")):
        rows.append(Tensor(f"self_attn.{proj}_proj.weight", Role.ATTENTION, (out, "hidden")))
        if biases:
            rows.append(Tensor(f"self_attn.{proj}_proj.bias", Role.ATTENTION, (out,)))
    rows.append(Tensor("self_attn.o_proj.weight", Role.ATTENTION, ("hidden", "q")))
    if qk_norm:
        rows += [Tensor("self_attn.q_norm.weight", Role.ATTENTION, ("head_dim",)),
                 Tensor("self_attn.k_norm.weight", Role.ATTENTION, ("head_dim",))]
    rows.append(Tensor("post_attention_layernorm.weight", Role.NORM, ("hidden",)))
    return tuple(rows)


_MLP = (
    Tensor("mlp.gate_proj.weight", Role.GATE_PROJ, ("inter", "hidden")),
    Tensor("mlp.up_proj.weight", Role.UP_PROJ, ("inter", "hidden")),
    Tensor("mlp.down_proj.weight", Role.DOWN_PROJ, ("hidden", "inter")),
)
_SILU = ("hidden_act", ("silu", None), "the experts here are SwiGLU MLPs with silu")
_NO_SLIDING = ("use_sliding_window", (False, None),
               "sliding-window Qwen layers are not supported (llama.cpp's Qwen MoE runs every layer in full)")


def _no(key: str, what: str) -> tuple[str, tuple[object, ...], str]:
    return (key, (False, None), f"this family has no {what} here (no MoE format here carries them)")


FAMILIES: tuple[BaseFamily, ...] = (
    BaseFamily("llama", ("llama",), "Llama", "no biases, no q/k norms", _attention() + _MLP,
               (_SILU, _no("attention_bias", "attention biases"), _no("mlp_bias", "MLP biases"))),
    BaseFamily("mistral", ("mistral",), "Mistral", "no biases, no q/k norms, optional sliding window",
               _attention() + _MLP, (_SILU, _no("attention_bias", "attention biases"), _no("mlp_bias", "MLP biases"))),
    BaseFamily("qwen2", ("qwen2",), "Qwen2", "q/k/v biases", _attention(biases=True) + _MLP, (_SILU, _NO_SLIDING)),
    BaseFamily("qwen3", ("qwen3",), "Qwen3", "q/k norms", _attention(qk_norm=True) + _MLP,
               (_SILU, _NO_SLIDING, _no("attention_bias", "attention biases")), needs=("head_dim",)),
)

# Dense model types no format here can express, and what is missing.
_INEXPRESSIBLE = {
    "gemma": "a GELU MLP, embeddings scaled by sqrt(hidden_size) and RMSNorm weights applied as (1 + w)",
    "gemma2": "a GELU MLP, scaled embeddings, (1 + w) norms, extra pre/post-feedforward norms and logit soft-capping",
    "gemma3": "a GELU MLP, scaled embeddings, (1 + w) and q/k norms, pre/post-feedforward norms and local layers",
    "gemma3_text": "a GELU MLP, scaled embeddings, (1 + w) and q/k norms, pre/post-feedforward norms and local layers",
    "phi3": "a fused qkv_proj and a fused gate_up_proj (no separate q/k/v and gate/up tensors)",
    "phi": "LayerNorms with biases, a GELU MLP with biases and attention and MLP in parallel",
    "gpt2": "fused attention (c_attn), LayerNorms with biases and a GELU MLP",
    "gpt_neox": "fused query_key_value, LayerNorms with biases and a GELU MLP",
    "falcon": "fused query_key_value, LayerNorms and a GELU MLP",
    "olmo2": "norms after attention and MLP (not before) and q/k norms over all heads",
    "granite": "embedding, residual, attention and logit multipliers",
    "cohere": "LayerNorm, attention and MLP in parallel and a logit scale",
    "starcoder2": "LayerNorms with biases and a GELU MLP with biases",
}
# Config keys that state an expert count: a model with one is a mixture of experts already.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def family_of(config: dict, field: str) -> BaseFamily:
    """The base family of a model's config.json, or a ModeError saying why it cannot be a base."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(f.name for f in FAMILIES)
    if model_type in _INEXPRESSIBLE:
        raise ModeError(f"{field}: model_type {model_type!r} has {_INEXPRESSIBLE[model_type]}, which no output format "
                        f"here can express (bases: {known})")
    if any(config.get(key) for key in _EXPERT_COUNT_KEYS):
        raise ModeError(f"{field}: model_type {model_type!r} is already a mixture of experts; give a dense base "
                        f"({known})")
    raise ModeError(f"{field}: model_type {model_type!r} is not a base family mergekit-mode knows ({known})")


def dims(config: dict) -> dict[str, int]:
    """The dimensions that shapes are stated in, from config.json."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {"hidden": hidden, "inter": int(config["intermediate_size"]), "vocab": int(config["vocab_size"]),
            "head_dim": head_dim, "q": heads * head_dim,
            "kv": int(config.get("num_key_value_heads") or heads) * head_dim}


def shape(tensor: Tensor, config: dict) -> tuple[int, ...]:
    """The shape config.json implies for a tensor: a header that disagrees means a damaged or
    mislabelled file, caught before it becomes a model that fails to load."""
    sizes = dims(config)
    return tuple(sizes[d] for d in tensor.shape)
