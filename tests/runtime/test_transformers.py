"""transformers loads the folder exactly (no missing/unexpected keys) and generates."""
from __future__ import annotations

import pytest

from .runtimes import hf_greedy, prompts_for

pytestmark = pytest.mark.runtime

N_NEW = 8


def test_transformers_loads_exactly_and_generates(moe_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(moe_dir)
    assert cfg.model_type == "mixtral" and cfg.architectures == ["MixtralForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), f"{k}: {info.get(k)}"
    model.eval()

    tok = AutoTokenizer.from_pretrained(moe_dir)
    assert len(tok) == cfg.vocab_size
    ids = tok("the expert router of the model", return_tensors="pt").input_ids
    assert ids[0, 0].item() == cfg.bos_token_id

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
