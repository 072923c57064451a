"""The canonical Mixtral checkpoint: the layout transformers, llama.cpp and vLLM all load.

Experts are stored one tensor per projection (`block_sparse_moe.experts.E.w1/w2/w3`), not in
transformers v5's fused internal layout (`mlp.experts.gate_up_proj`) that mergekit 0.1.5 writes and
that llama.cpp's converter and vLLM reject. The config states rope_theta explicitly because
Mixtral's default (1e6) is not Llama's (1e4). Mixtral has no biases and no q/k norms, so it takes
Llama and Mistral bases only.
"""

from __future__ import annotations

from typing import Optional

from mergekit_mode.formats.base import OutputFormat, SharedExpert
from mergekit_mode.formats.families import Role

_EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}."


class Mixtral(OutputFormat):
    name = "mixtral"
    title = "Mixtral"
    architecture = "MixtralForCausalLM"
    families = ("llama", "mistral")
    experts_key = "num_local_experts"
    renormalise = True  # softmax over all experts, top-k, rescaled to sum to 1
    experts = {Role.GATE_PROJ: _EXPERT + "w1.weight", Role.DOWN_PROJ: _EXPERT + "w2.weight",
               Role.UP_PROJ: _EXPERT + "w3.weight"}
    router = "model.layers.{layer}.block_sparse_moe.gate.weight"

    def format_config(self, base_config: dict, shared: Optional[SharedExpert]) -> dict:
        return {"sliding_window": base_config.get("sliding_window"), "router_jitter_noise": 0.0}
