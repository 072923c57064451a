"""Qwen3-MoE (Qwen3MoeForCausalLM), the MoE of Qwen3 bases: their q/k norms kept, no biases.

Same layout as Qwen2-MoE without the shared expert (`mlp.experts.E.{gate,up,down}_proj`,
`mlp.gate`). llama.cpp's qwen3moe graph always rescales the top-k weights to sum to 1, so
norm_topk_prob is true: the k weights sum to 1, as in the Llama/Mistral output. Tied embeddings stay tied
(llama.cpp falls back to the token embeddings for the output).
"""

from __future__ import annotations

from typing import Optional

from mergekit_mode.formats.base import SharedExpert
from mergekit_mode.formats.qwen2_moe import QwenMoe


class Qwen3Moe(QwenMoe):
    name = "qwen3_moe"
    title = "Qwen3-MoE"
    architecture = "Qwen3MoeForCausalLM"
    families = ("qwen3",)
    renormalise = True

    def own_config(self, shared: Optional[SharedExpert]) -> dict:
        return {"attention_bias": False}
