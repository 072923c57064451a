"""Model folders the runtime checks run on: outputs of the real CLI.

THE ONE PLACE that decides which models are checked: the session fixture `moe_dirs` returns
{name: model folder}, each built by `mergekit-mode recipe.yml out/` from tiny Llama or Mistral
bases, experts and LoRA adapters made here. The checks in test_*.py only read the folders.

Sizes: head_dim 32 (hidden 64, 2 heads, 1 KV head) because vLLM's CPU attention supports head
sizes 32, 64, 80, ... only; init_std 0.15 and a standard-normal router (`random`) so logits spread
and greedy picks and top-2 choices have clear margins.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from mergekit_mode.cli import main
from mergekit_mode.toy import DOMAINS, generate, make_expert, make_model, train_tokenizer
from mergekit_mode.toy.adapters import make_adapter

# name -> (base arch, full experts, adapter experts, router)
MODELS = {
    "llama-e3-top2": ("llama", 3, 0, {"mode": "random", "experts_per_token": 2, "seed": 1}),
    "llama-e4-gateless": ("llama", 4, 0, {"mode": "gateless"}),
    "mistral-e3-gateless": ("mistral", 3, 0, {"mode": "gateless"}),
    "mistral-e4-top2": ("mistral", 4, 0, {"mode": "random", "experts_per_token": 2, "seed": 2}),
    "llama-2full-2lora-top2": ("llama", 2, 2, {"mode": "random", "experts_per_token": 2, "seed": 3}),
}
MODEL_NAMES = list(MODELS)
SIZES = dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2, num_kv_heads=1,
             vocab_size=512, init_std=0.15)


def build_with_cli(root: Path, tokenizer: Path, arch: str, full: int, adapters: int, router: dict) -> Path:
    base = make_model(root / "base", arch, tokenizer_dir=tokenizer, seed=7,
                      rope_theta=1e6 if arch == "mistral" else 5e5, **SIZES)
    experts = [{"name": f"full{i}", "model": str(make_expert(base, root / f"full{i}", seed=i, mlp_scale=0.5))}
               for i in range(full)]
    experts += [{"name": f"lora{i}", "adapter": str(make_adapter(
        base, root / f"lora{i}", seed=10 + i, r=4, lora_alpha=8,
        target_modules=["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]))} for i in range(adapters)]
    recipe = root / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"base_model": str(base), "experts": experts, "router": router}))
    try:
        main([str(recipe), str(root / "out"), "-q"])
    except SystemExit as e:
        assert not e.code, f"mergekit-mode failed on {recipe}"
    out = root / "out"
    # the folder must be in the canonical Mixtral layout (what runtimes load)
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            keys |= set(st.keys())
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys, sorted(keys)[:8]
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys), "non-canonical (transformers-internal) layout"
    return out


@pytest.fixture(scope="session")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    tokenizer = train_tokenizer([generate(d, 4000, seed=1) for d in DOMAINS], root / "tokenizer")
    return {name: build_with_cli(root / name, tokenizer, *spec) for name, spec in MODELS.items()}


@pytest.fixture(params=MODEL_NAMES)
def moe_dir(request, moe_dirs) -> Path:
    return moe_dirs[request.param]
