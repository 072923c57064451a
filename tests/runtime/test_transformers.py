"""transformers loads the folder exactly (the format's own tensor names, no missing/unexpected keys),
its logits equal a reference written out here (the dense base class with the documented MoE
block), and it generates."""
from __future__ import annotations

import json

import pytest

from .reference import FORMATS, expected_keys, read_all, reference_model
from .runtimes import hf_greedy, prompts_for

pytestmark = pytest.mark.runtime

N_NEW = 8
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
BASE_FORMAT = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def test_transformers_loads_exactly_and_generates(moe_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(moe_dir)
    assert cfg.model_type == BASE_FORMAT[moe_dir.parent.name.split("-")[0]]
    assert cfg.architectures == [ARCHITECTURES[cfg.model_type]]
    assert set(read_all(moe_dir)) == expected_keys(moe_dir)
    model, info = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == ARCHITECTURES[cfg.model_type]
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), f"{k}: {info.get(k)}"
    model.eval()

    tok = AutoTokenizer.from_pretrained(moe_dir)
    assert len(tok) == cfg.vocab_size
    ids = tok("the expert router of the model", return_tensors="pt").input_ids

    eos = cfg.eos_token_id
    for prompt in prompts_for(moe_dir) + [ids[0].tolist()]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=N_NEW, do_sample=False, pad_token_id=eos)
        got = out[0, len(prompt):].tolist()
        ref = hf_greedy(model, prompt, N_NEW)
        if eos in ref:  # generate() stops at EOS (and pads after it)
            ref = ref[: ref.index(eos) + 1]
            got = got[: len(ref)]
        assert got == ref, (prompt, got, ref)


def test_logits_equal_the_dense_class_with_the_documented_block(moe_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    reference = reference_model(moe_dir)
    cfg = json.loads((moe_dir / "config.json").read_text())
    assert cfg["model_type"] in FORMATS
    for prompt in prompts_for(moe_dir):
        with torch.no_grad():
            got = model(torch.tensor([prompt])).logits
            want = reference(torch.tensor([prompt])).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
