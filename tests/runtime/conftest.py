"""Model folders the runtime checks run on.

THE ONE PLACE that decides which models are checked: the session fixture `moe_dirs`
returns {name: model folder}. Today it builds tiny canonical-Mixtral checkpoints
itself (transformers' own MixtralForCausalLM, random float32 weights, a sentencepiece
tokenizer trained offline). To check the project's outputs instead, replace the
body of `moe_dirs` (e.g. run `mergekit-mode recipe.yml out/` per recipe) and keep
the names in MODEL_NAMES in step. The checks in test_*.py only read the folders.
"""
from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

import pytest

# name -> (num_local_experts, num_experts_per_tok, gate_less)
TOY_MODELS = {
    "e3-top2": (3, 2, False),
    "e4-top2": (4, 2, False),
    "e3-gateless": (3, 3, True),
    "e4-gateless": (4, 4, True),
}
MODEL_NAMES = list(TOY_MODELS)

VOCAB = 320


@functools.lru_cache(maxsize=None)
def _sentencepiece_model(vocab_size: int) -> bytes:
    import sentencepiece as spm

    rng = random.Random(0)
    words = (
        "the a of to and in is it that for on with as was by at be this from or an are not "
        "have has but one all can more if will about which time out up so what when there do "
        "them some into two other expert router layer model merge token"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    assert spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size() == vocab_size
    return buf.getvalue()


def _train_sentencepiece(out_dir: Path, vocab_size: int = VOCAB) -> None:
    """tokenizer.model + tokenizer_config.json (LlamaTokenizer); ids 0/1/2 = unk/bos/eos."""
    (out_dir / "tokenizer.model").write_bytes(_sentencepiece_model(vocab_size))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "model_max_length": 256,
    }, indent=2))


def make_toy_mixtral(out_dir: Path, n_experts: int, top_k: int, gate_less: bool, seed: int = 0) -> Path:
    """A tiny MixtralForCausalLM (hidden 64, 2 layers) saved in the canonical layout.

    head_dim 32 (2 heads, 1 KV head): vLLM's CPU attention supports head sizes
    32, 64, 80, 96, ... only (head_dim 16 fails: "Unsupported CPU attention configuration")."""
    import torch
    from safetensors import safe_open
    from transformers import MixtralConfig, MixtralForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        num_local_experts=n_experts, num_experts_per_tok=top_k, rope_theta=1e6,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        # larger than the default 0.02 so logits spread and greedy picks have clear margins
        initializer_range=0.15,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            # transformers 5 calls the router module `gate` either under .mlp or .block_sparse_moe
            moe = getattr(layer, "mlp", None) or layer.block_sparse_moe
            router = moe.gate.weight
            if gate_less:
                router.zero_()  # softmax of zeros = 1/E, top-k = E: every expert, equal weight
            else:
                router.normal_(0.0, 1.0)  # clear routing margins
    model.save_pretrained(out_dir, safe_serialization=True)
    _train_sentencepiece(out_dir)
    # the folder must be in the canonical Mixtral layout (what runtimes load)
    keys = set()
    for f in out_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            keys |= set(st.keys())
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys, sorted(keys)[:8]
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys), "non-canonical (transformers-internal) layout"
    return out_dir


@pytest.fixture(scope="session")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: make_toy_mixtral(root / name, *spec) for name, spec in TOY_MODELS.items()}


@pytest.fixture(params=MODEL_NAMES)
def moe_dir(request, moe_dirs) -> Path:
    return moe_dirs[request.param]
