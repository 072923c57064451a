"""The bytes of a small deterministic build are pinned: a change of them is a format change.

Inputs are written here from integer arithmetic (no RNG, no transformers init), so the digests
depend only on mergekit-mode's own code: tensor names, order, shapes, dtypes, the safetensors
header it writes and the config it states. Refactors must leave them alone. A deliberate format
change (a renamed tensor, a new config key) changes them: then re-pin by running this file with
MERGEKIT_MODE_PRINT_PINS=1 (it prints the new digests) and say in the commit why the output
changed, since every existing recipe then builds different bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import write_recipe

SIZES = dict(hidden=16, inter=32, heads=2, kv_heads=1, layers=2, vocab=32)


def _values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic values in [-0.5, 0.5) from integers: the same on every machine and torch."""
    n = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64)
    return (((n * 7919 + seed * 104729) % 997).to(torch.float32) / 997 - 0.5).reshape(shape)


def _llama(folder: Path, seed: int, mlp_seed: int) -> Path:
    """A tiny Llama folder; `mlp_seed` varies the MLP only (an expert of the same base)."""
    h, i, v = SIZES["hidden"], SIZES["inter"], SIZES["vocab"]
    head_dim = h // SIZES["heads"]
    kv = SIZES["kv_heads"] * head_dim
    tensors = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(SIZES["layers"]):
        p = f"model.layers.{layer}."
        tensors |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i)}
    folder.mkdir(parents=True)
    save_file({name: _values(shape, (mlp_seed if ".mlp." in name else seed) * 1000 + k)
               for k, (name, shape) in enumerate(sorted(tensors.items()))}, folder / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": i, "num_hidden_layers": SIZES["layers"], "num_attention_heads": SIZES["heads"],
              "num_key_value_heads": SIZES["kv_heads"], "head_dim": head_dim, "vocab_size": v,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# sha256 of the output files. Re-pin only for a deliberate format change (see the module docstring).
PINS = {
    "gateless-float32": {
        "model.safetensors": "a496b98431ad215704dd51c157df1247ff957c2c26f4ac3bef5039ad0ceea0d3",
        "config.json": "1b61a2e30f2514dc85b92ffb7d60e62cbdafa83f0a6a294655e6e1b6c3f35a21",
    },
    "gateless-bfloat16": {
        "model.safetensors": "fa6d7be35ef6ac358c4d1087f560d40463ba8eef5803f20ebffe55e110254697",
        "config.json": "778e38c54c56905bd7fd27ce02952d1946c98325cd1c12dfcb9a654593c61250",
    },
}


@pytest.mark.parametrize("variant", list(PINS))
def test_small_build_has_pinned_bytes(tmp_path, run_cli, variant):
    dtype = variant.split("-")[1]
    base = _llama(tmp_path / "base", seed=1, mlp_seed=1)
    experts = [_llama(tmp_path / f"e{e}", seed=1, mlp_seed=10 + e) for e in range(3)]
    recipe = write_recipe(tmp_path / "r.yml", base, experts, names=["a", "b", "c"], dtype=dtype)
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 0, result.err
    got = {name: hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() for name in PINS[variant]}
    if os.environ.get("MERGEKIT_MODE_PRINT_PINS"):
        print(f"\n{variant}: {json.dumps(got, indent=2)}")
    assert got == PINS[variant]
