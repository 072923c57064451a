"""Tiny random-weight Llama/Mistral/Qwen2/Qwen3 checkpoints and cheap noisy "experts" of them.

The checkpoints are real Hugging Face model folders (config.json, generation_config.json,
safetensors, optional index and tokenizer files), so every code path the project exercises
on large models - sharded reading, key mapping, runtimes - can be tested in milliseconds.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .tokenizer import BOS_ID, EOS_ID, copy_tokenizer, tokenizer_size

ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
# Tensors a fresh init leaves constant (biases 0, norms 1) get noise, so that a wrong copy of them shows.
_BIASES, _QK_NORMS = "_proj.bias", ("q_norm.weight", "k_norm.weight")

MLP_PROJS: tuple[str, ...] = ("mlp.gate_proj.", "mlp.up_proj.", "mlp.down_proj.")
ATTN_PROJS: tuple[str, ...] = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj.")


def make_model(
    out_dir: Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: Path | None = None,
    max_shard_size: str | None = None,
    tie_word_embeddings: bool = False,
    rope_theta: float | None = None,
    sliding_window: int | None = None,
    init_std: float = 0.02,
) -> Path:
    """Save a random-weight ``LlamaForCausalLM`` (or Mistral, Qwen2, Qwen3) to ``out_dir``.

    Weights are drawn in float32 from ``seed`` (Llama's normal init with ``init_std``; Qwen2's q/k/v
    biases and Qwen3's q/k norms get noise of their own) and then cast, so the
    same arguments give byte-identical files. ``max_shard_size`` (e.g. ``"100KB"``) forces a
    sharded checkpoint with ``model.safetensors.index.json``. With ``tokenizer_dir`` the
    tokenizer files are copied and ``vocab_size`` must cover the tokenizer (runtimes such as
    llama.cpp index the embedding by token id).
    """
    out_dir = Path(out_dir)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if tokenizer_dir is not None and tokenizer_size(tokenizer_dir) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tokenizer_size(tokenizer_dir)}")
    if sliding_window is not None and arch != "mistral":
        raise ValueError("sliding_window is a Mistral option; use arch='mistral'")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    extra: dict[str, object] = {} if rope_theta is None else {"rope_theta": rope_theta}
    if arch == "mistral":
        extra["sliding_window"] = sliding_window
    config = ARCHS[arch][0](
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        hidden_act="silu",
        **extra,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = ARCHS[arch][1](config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                std = init_std if name.endswith(_BIASES) else 0.1 if name.endswith(_QK_NORMS) else 0.0
                if std:
                    param.add_(torch.randn_like(param) * std)
        model = model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size or "50GB")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)
        if arch in QWEN_ARCHS:
            _declare_qwen_tokenizer(out_dir)
    return out_dir


QWEN_ARCHS = ("qwen2", "qwen3")


def _declare_qwen_tokenizer(out_dir: Path) -> None:
    """A Qwen folder with the toy sentencepiece tokenizer names Qwen2Tokenizer, as real Qwen folders do.

    Declared `LlamaTokenizer`, transformers 5 loads it as Qwen2Tokenizer with a qwen2/qwen3 config
    but as LlamaTokenizer with a qwen2_moe one: the base and its MoE would see other token ids
    (measured: gate-less Qwen2-MoE perplexity 2304 instead of 14.6). BPE tokenizers (SmolLM2's, for
    llama.cpp) keep their own class."""
    file = out_dir / "tokenizer_config.json"
    config = json.loads(file.read_text())
    if config.get("tokenizer_class") == "LlamaTokenizer":
        file.write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}, indent=2) + "\n")


def make_expert(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    mlp_scale: float = 0.05,
    attn_scale: float = 0.0,
) -> Path:
    """Copy ``base_dir`` to ``out_dir`` with seeded noise on the MLP (and optionally attention).

    A stand-in for a fine-tune where only the weights' structure matters (plans, numerics):
    each selected tensor W becomes ``W + scale * std(W) * N(0, 1)``, computed in float32 and
    cast back. Works file by file, so shard layout, index and dtypes are kept exactly; the
    noise for a tensor depends only on ``seed`` and the tensor's name.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(base_dir, out_dir)
    scales = [(p, mlp_scale) for p in MLP_PROJS] + [(p, attn_scale) for p in ATTN_PROJS]
    for shard in sorted(out_dir.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, framework="pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                tensor = f.get_tensor(name)
                scale = next((s for p, s in scales if p in name), 0.0)
                if scale and tensor.numel() > 1:
                    tensor = _add_noise(tensor, scale, seed=zlib.crc32(f"{seed}:{name}".encode()))
                tensors[name] = tensor
        save_file(tensors, shard, metadata=metadata)
    return out_dir


def _add_noise(tensor: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """``tensor + scale * std * N(0, 1)`` drawn from a private generator, in float32."""
    w = tensor.float()
    gen = torch.Generator().manual_seed(seed)
    return (w + scale * w.std() * torch.randn(w.shape, generator=gen)).to(tensor.dtype)

