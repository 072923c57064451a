"""The canonical Mixtral checkpoint: the layout transformers, llama.cpp and vLLM all load.

Experts are stored one tensor per projection (`block_sparse_moe.experts.E.w1/w2/w3`), not in
transformers v5's fused internal layout (`mlp.experts.gate_up_proj`) that mergekit 0.1.5 writes and
that llama.cpp's converter and vLLM reject. The config states rope_theta explicitly because
Mixtral's default (1e6) is not Llama's (1e4).
"""

from __future__ import annotations

from mergekit_mode.errors import ModeError

ARCHITECTURE = "MixtralForCausalLM"
INPUT_MODEL_TYPES = ("llama", "mistral")

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Per layer, copied from the stem (the base): same name in input and output.
LAYER_SHARED = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
)

# Expert projection in the output <- MLP projection of a dense Llama/Mistral layer.
EXPERT_FROM_MLP = {"w1": "mlp.gate_proj.weight", "w2": "mlp.down_proj.weight", "w3": "mlp.up_proj.weight"}

# Tensors a dense checkpoint may carry that have no place in Mixtral and carry no weights.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shape(config: dict, name: str) -> tuple[int, ...]:
    """The shape config.json implies for a dense input tensor: a header that disagrees means a
    damaged or mislabelled file, caught before it becomes a model that fails to load."""
    hidden, inter, vocab = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["vocab_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    shapes = {
        EMBED: (vocab, hidden), LM_HEAD: (vocab, hidden), FINAL_NORM: (hidden,),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    return shapes[suffix]


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_tensor(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"


def router_tensor(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


# Config keys taken over from the base as they are (when present). Everything that shapes the
# attention stem and the tokenizer interface; the MLP keys are re-stated for the experts.
_COPIED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "initializer_range",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "rope_scaling", "rope_parameters",
)


def rope_theta(base_config: dict) -> float:
    """The base's rope theta, wherever its transformers version put it (Llama/Mistral default 1e4)."""
    if "rope_theta" in base_config:
        return float(base_config["rope_theta"])
    params = base_config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return 10000.0


def check_base_config(config: dict, field: str) -> None:
    """Refuse bases whose stem Mixtral cannot express, instead of silently dropping weights."""
    model_type = config.get("model_type")
    if model_type not in INPUT_MODEL_TYPES:
        raise ModeError(f"{field}: model_type {model_type!r} is not supported (Mixtral output takes llama or mistral)")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModeError(f"{field}: hidden_act {act!r}: Mixtral experts use silu")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ModeError(f"{field}: {key} is true, but Mixtral has no biases")
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModeError(f"{field}: partial_rotary_factor is not supported by Mixtral")


def build_config(base_config: dict, num_experts: int, experts_per_token: int, dtype: str) -> dict:
    """config.json of the output. Written by us, key-sorted, so output bytes don't depend on the
    installed transformers version."""
    config = {k: base_config[k] for k in _COPIED_KEYS if k in base_config}
    theta = rope_theta(base_config)
    config["rope_theta"] = theta
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        config["rope_parameters"] = {**params, "rope_theta": theta}
    elif "rope_scaling" not in config:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    config.update(
        architectures=[ARCHITECTURE],
        model_type="mixtral",
        hidden_act="silu",
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        sliding_window=base_config.get("sliding_window"),
        output_router_logits=False,
        router_aux_loss_coef=0.001,
        router_jitter_noise=0.0,
        use_cache=True,
        dtype=dtype,
        torch_dtype=dtype,
    )
    return dict(sorted(config.items()))
