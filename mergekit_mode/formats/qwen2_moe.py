"""Qwen2-MoE (Qwen2MoeForCausalLM), the MoE of Qwen2/Qwen2.5 bases: their q/k/v biases kept.

Layout as Qwen's own checkpoints on the hub (`mlp.experts.E.{gate,up,down}_proj`, `mlp.gate`), which
transformers converts on load, llama.cpp's converter stacks and vLLM loads. Its block adds a shared
expert on every token: routed mixture + sigmoid(shared_expert_gate . x) * shared_expert(x).

What the runtimes fix, and so what this format states:
- llama.cpp's qwen2moe graph never rescales the top-k weights (whatever norm_topk_prob says), so
  norm_topk_prob is false here for every router mode: the k chosen experts keep their softmax
  probabilities. With top-k = all experts (gate-less) that is the plain mean of the experts.
- llama.cpp requires the shared expert (tensors and size) and computes its gate as silu(z)/z,
  which is 0/0 for an all-zero gate: the gate row is never exactly zero (routers.shared_gates).
- llama.cpp's qwen2moe requires an lm_head tensor: a tied base's embeddings are written twice.
By default the shared expert is unused: all zeros and small, so the block is the routed mixture.
"""

from __future__ import annotations

from typing import Optional

from mergekit_mode.formats.base import OutputFormat, SharedExpert
from mergekit_mode.formats.families import Role

_LAYER = "model.layers.{layer}.mlp."


class QwenMoe(OutputFormat):
    """What the Qwen MoE formats share: Qwen's hub layout, every layer sparse, the experts the
    base's MLPs, and norm_topk_prob stating the block's `renormalise`."""

    experts_key = "num_experts"
    experts = {role: _LAYER + "experts.{expert}." + role.value + ".weight"
               for role in (Role.GATE_PROJ, Role.UP_PROJ, Role.DOWN_PROJ)}
    router = _LAYER + "gate.weight"

    def format_config(self, base_config: dict, shared: Optional[SharedExpert]) -> dict:
        return {"moe_intermediate_size": int(base_config["intermediate_size"]), "norm_topk_prob": self.renormalise,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
                "sliding_window": None, **self.own_config(shared)}

    def own_config(self, shared: Optional[SharedExpert]) -> dict:
        return {}


class Qwen2Moe(QwenMoe):
    name = "qwen2_moe"
    title = "Qwen2-MoE"
    architecture = "Qwen2MoeForCausalLM"
    families = ("qwen2",)
    renormalise = False
    shared_expert = {role: _LAYER + "shared_expert." + role.value + ".weight" for role in QwenMoe.experts}
    shared_expert_gate = _LAYER + "shared_expert_gate.weight"
    # An unused shared expert's size: one block of llama.cpp's q8_0 (32 values), so every export type
    # quantizes it, at a cost of 3 x 32 x hidden_size zeros per layer.
    empty_shared_expert_size = 32
    ties_embeddings = False

    def own_config(self, shared: Optional[SharedExpert]) -> dict:
        assert shared is not None, "the plan sizes Qwen2-MoE's shared expert"
        return {"qkv_bias": True, "shared_expert_intermediate_size": shared.intermediate_size,
                "tie_word_embeddings": False}
