"""Qwen2-MoE (Qwen2MoeForCausalLM), the MoE of Qwen2/Qwen2.5 bases: their q/k/v biases kept.

Layout as Qwen's own checkpoints on the hub (`mlp.experts.E.{gate,up,down}_proj`, `mlp.gate`), which
transformers converts on load, llama.cpp's converter stacks and vLLM loads. Its block adds a shared
expert on every token: routed mixture + sigmoid(shared_expert_gate . x) * shared_expert(x).

What the runtimes fix, and so what this format states:
- llama.cpp's qwen2moe graph never rescales the top-k weights (whatever norm_topk_prob says), so
  norm_topk_prob is false here for every router mode: the k chosen experts keep their softmax
  probabilities. With top-k = all experts (gate-less) that is the plain mean, as in Mixtral.
- llama.cpp requires the shared expert (tensors and size) and computes its gate as silu(z)/z,
  which is 0/0 for an all-zero gate: the gate row is never exactly zero (routers.shared_gates).
- llama.cpp's qwen2moe requires an lm_head tensor: a tied base's embeddings are written twice.
By default the shared expert is unused: all zeros and small, so the block is the routed mixture.
"""

from __future__ import annotations

from typing import Optional

from mergekit_mode.formats.base import OutputFormat, SharedExpert, copied_config
from mergekit_mode.formats.families import Role

_LAYER = "model.layers.{layer}.mlp."
EXPERTS = {role: _LAYER + "experts.{expert}." + role.value + ".weight"
           for role in (Role.GATE_PROJ, Role.UP_PROJ, Role.DOWN_PROJ)}
ROUTER = _LAYER + "gate.weight"


def moe_config(base_config: dict, architecture: str, model_type: str, num_experts: int, top_k: int, dtype: str,
               norm_topk_prob: bool) -> dict:
    """The keys the Qwen MoE configs share: the experts are the base's MLPs, every layer sparse."""
    config = copied_config(base_config)
    inter = int(base_config["intermediate_size"])
    config.update(
        architectures=[architecture],
        model_type=model_type,
        hidden_act="silu",
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=inter,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
        sliding_window=None,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
        use_cache=True,
        dtype=dtype,
        torch_dtype=dtype,
    )
    return config


class Qwen2Moe(OutputFormat):
    name = "qwen2_moe"
    title = "Qwen2-MoE"
    architecture = "Qwen2MoeForCausalLM"
    families = ("qwen2",)
    experts_key = "num_experts"
    renormalise = False
    experts = EXPERTS
    router = ROUTER
    shared_expert = {role: _LAYER + "shared_expert." + role.value + ".weight" for role in EXPERTS}
    shared_expert_gate = _LAYER + "shared_expert_gate.weight"
    shared_gate_parameter = "mlp.shared_expert_gate.weight"
    # An unused shared expert's size: one block of llama.cpp's q8_0 (32 values), so every export type
    # quantizes it, at a cost of 3 x 32 x hidden_size zeros per layer.
    empty_shared_expert_size = 32
    ties_embeddings = False

    def build_config(self, base_config: dict, num_experts: int, top_k: int, dtype: str,
                     shared: Optional[SharedExpert]) -> dict:
        assert shared is not None, "the plan sizes Qwen2-MoE's shared expert"
        config = moe_config(base_config, self.architecture, self.name, num_experts, top_k, dtype, norm_topk_prob=False)
        config.update(qkv_bias=True, shared_expert_intermediate_size=shared.intermediate_size,
                      tie_word_embeddings=False)
        return dict(sorted(config.items()))
