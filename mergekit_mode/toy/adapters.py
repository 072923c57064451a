"""Tiny peft LoRA adapters, and the ones recipes/adapters.yml builds from.

Adapters are made by peft itself (get_peft_model + save_pretrained), so they carry exactly the
keys and config a real training run writes; A and B are random and non-zero (a freshly
initialised LoRA has B = 0 and would merge to nothing).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM



def make_adapter(stem: Path, out_dir: Path, *, seed: int, **lora: object) -> Path:
    """Save a LoRA adapter of the model in `stem` with random A and B; `lora` goes to LoraConfig.

    With use_dora the magnitudes are moved off their initial ||W|| (times 1 + 0.1 N(0, 1)), so
    that a merge which ignored them would show."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(stem)
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def make_demo_adapters(demo_out: Path) -> Path:
    """The adapters recipes/adapters.yml names, made on the base `mergekit-mode demo` trained:
    a LoRA on attention and MLP, and a DoRA + rsLoRA adapter (random, so they show the mechanics,
    not a skill)."""
    demo_out = Path(demo_out)
    base = demo_out / "base"
    make_adapter(base, demo_out / "adapters" / "arithmetic", seed=3, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    make_adapter(base, demo_out / "adapters" / "dna", seed=4, r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                 target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    return demo_out / "adapters"
