"""A reference for MoE folders written out here, independent of mergekit_mode.formats: the tensor
names each format's own checkpoints use, and logits computed by the base family's *dense*
transformers class with every MLP replaced by the MoE block as the docs state it:

  softmax(router . x) over all experts, keep the top k, rescale them to sum to 1 (Mixtral,
  Qwen3-MoE; not Qwen2-MoE), weighted sum of SwiGLU experts; Qwen2-MoE adds
  sigmoid(shared_expert_gate . x) * shared_expert(x) on every token.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

# model_type -> (dense model_type of the base, expert count key, expert tensor (layer, expert, proj),
#                router tensor (layer), rescales the top-k weights, has a shared expert)
FORMATS = {
    "mixtral": ("llama", "num_local_experts",
                lambda l, e, p: f"model.layers.{l}.block_sparse_moe.experts.{e}.{dict(gate='w1', down='w2', up='w3')[p]}.weight",
                lambda l: f"model.layers.{l}.block_sparse_moe.gate.weight", True, False),
    "qwen3_moe": ("qwen3", "num_experts", lambda l, e, p: f"model.layers.{l}.mlp.experts.{e}.{p}_proj.weight",
                  lambda l: f"model.layers.{l}.mlp.gate.weight", True, False),
    "qwen2_moe": ("qwen2", "num_experts", lambda l, e, p: f"model.layers.{l}.mlp.experts.{e}.{p}_proj.weight",
                  lambda l: f"model.layers.{l}.mlp.gate.weight", False, True),
}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors |= {name: f.get_tensor(name).float() for name in f.keys()}
    return tensors


def expected_keys(folder: Path) -> set[str]:
    """Every tensor name the format's own checkpoints have, for this config."""
    cfg = json.loads((folder / "config.json").read_text())
    dense, count_key, expert, router, _, shared = FORMATS[cfg["model_type"]]
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.get("tie_word_embeddings"):
        names.add("lm_head.weight")
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", router(layer)}
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {expert(layer, e, x) for e in range(cfg[count_key]) for x in ("gate", "up", "down")}
        if dense == "qwen3":
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        if dense == "qwen2":
            names |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
        if shared:
            names |= {p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")}
            names.add(p + "mlp.shared_expert_gate.weight")
    return names


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


class Block(torch.nn.Module):
    """The MoE block of one layer, from the folder's tensors."""

    def __init__(self, tensors: dict, cfg: dict, layer: int) -> None:
        super().__init__()
        _, count_key, expert, router, self.rescale, shared = FORMATS[cfg["model_type"]]
        self.k = cfg["num_experts_per_tok"]
        self.router = tensors[router(layer)]
        self.experts = [[tensors[expert(layer, e, p)] for p in ("gate", "up", "down")] for e in range(cfg[count_key])]
        p = f"model.layers.{layer}.mlp.shared_expert"
        self.shared = ([tensors[f"{p}.{x}_proj.weight"] for x in ("gate", "up", "down")], tensors[f"{p}_gate.weight"]) \
            if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(x @ self.router.T, dim=-1)
        top, index = probs.topk(self.k, dim=-1)
        if self.rescale:
            top = top / top.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, weights in enumerate(self.experts):
            w = (top * (index == e)).sum(-1, keepdim=True)  # this expert's weight per token (0 if not chosen)
            y = y + w * _swiglu(x, *weights)
        if self.shared is not None:
            y = y + torch.sigmoid(x @ self.shared[1].T) * _swiglu(x, *self.shared[0])
        return y


def reference_model(folder: Path):
    """The dense base class with the folder's stem, every MLP replaced by `Block`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    dense = FORMATS[cfg["model_type"]][0]
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
            "bos_token_id", "eos_token_id")
    config = AutoConfig.for_model(dense, intermediate_size=1, **{k: cfg[k] for k in keep if k in cfg})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = read_all(folder)
    stem = {name: tensors[name] for name in model.state_dict() if ".mlp." not in name and name in tensors}
    missing = {n for n in model.state_dict() if ".mlp." not in n} - set(stem)
    assert missing <= ({"lm_head.weight"} if cfg.get("tie_word_embeddings") else set()), missing
    model.load_state_dict(stem, strict=False)
    for layer, decoder in enumerate(model.model.layers):
        decoder.mlp = Block(tensors, cfg, layer)
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
    return model
