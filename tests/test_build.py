"""End-to-end builds through the CLI, checked against transformers and hand-written references."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.conftest import write_recipe


def load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    return model.eval(), info


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    """Read a tensor with the safetensors library (independent of mergekit_mode's reader)."""
    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(folder / file, framework="pt") as f:
        return f.get_tensor(name).float()


def mlp(folder: Path, layer: int, x: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU MLP from an expert's own files: down(silu(gate x) * up x)."""
    p = f"model.layers.{layer}.mlp."
    gate, up, down = (read_tensor(folder, p + n + ".weight") for n in ("gate_proj", "up_proj", "down_proj"))
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("router", ["gateless", "noisy", "random"])
def test_output_loads_without_missing_or_unexpected_keys(request, tmp_path, run_cli, family, router):
    fam = request.getfixturevalue(family)
    recipe = write_recipe(tmp_path / "r.yml", fam.base, fam.experts, router={"mode": router})
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 0, result.err
    model, info = load(tmp_path / "out")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[1, 5, 9, 14]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize("router", ["gateless", "noisy"])
def test_copies_of_the_base_reproduce_its_logits(llama, tmp_path, run_cli, router):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, [llama.base] * 3, names=["a", "b", "c"],
                          router={"mode": router})
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    moe, _ = load(tmp_path / "out")
    dense, _ = load(llama.base)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0  # Llama-3-style theta kept, not Mixtral's default 1e6


def test_gateless_layer_output_is_the_mean_of_the_experts(mistral, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", mistral.base, mistral.experts, router={"mode": "gateless"})
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    moe, _ = load(tmp_path / "out")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    for layer in range(2):
        expected = torch.stack([mlp(e, layer, x) for e in mistral.experts]).mean(0)
        with torch.no_grad():
            out = moe.model.layers[layer].mlp(x)
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


def test_top1_sends_each_token_through_its_chosen_expert_only(llama, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts,
                          router={"mode": "random", "experts_per_token": 1, "seed": 3})
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    moe, _ = load(tmp_path / "out")
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(2))
    for layer in range(2):
        gate = read_tensor(tmp_path / "out", f"model.layers.{layer}.block_sparse_moe.gate.weight")
        chosen = (x @ gate.T).argmax(-1)
        assert len(chosen.unique()) > 1  # the check means something only if choices differ
        per_expert = torch.stack([mlp(e, layer, x) for e in llama.experts])  # [E, B, T, H]
        expected = torch.gather(per_expert, 0, chosen[None, ..., None].expand(1, *x.shape))[0]
        with torch.no_grad():
            out = moe.model.layers[layer].mlp(x)
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_recipe_and_seed_give_identical_bytes(mistral, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", mistral.base, mistral.experts,
                          router={"mode": "noisy", "seed": 7}, output={"shard_size": "200KB"})
    assert run_cli(recipe, tmp_path / "a", "-q").code == 0
    assert run_cli(recipe, tmp_path / "b", "-q").code == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = write_recipe(tmp_path / "r2.yml", mistral.base, mistral.experts,
                         router={"mode": "noisy", "seed": 8}, output={"shard_size": "200KB"})
    assert run_cli(other, tmp_path / "c", "-q").code == 0
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_sharded_output_has_an_index_that_matches_its_shards(mistral, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", mistral.base, mistral.experts, output={"shard_size": "150KB"})
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    total = 0
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            names = set(f.keys())
            assert names == {n for n, s in index["weight_map"].items() if s == shard}
            total += sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names)
    assert total == index["metadata"]["total_size"]


def test_output_carries_tokenizer_card_and_recipe(llama, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts, dtype="bfloat16")
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    out = tmp_path / "out"
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "README.md",
                 "mergekit_mode_recipe.yml", "config.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert str(llama.experts[1]) in card and "gateless" in card
    assert (out / "mergekit_mode_recipe.yml").read_text() == recipe.read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["num_experts_per_tok"] == 3 and cfg["num_local_experts"] == 3
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        gate = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert not gate.any()  # gate-less: all-zero router


def test_dry_run_prints_every_tensor_and_writes_nothing(llama, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts)
    result = run_cli(recipe, tmp_path / "out", "--dry-run")
    assert result.code == 0, result.err
    assert not (tmp_path / "out").exists()
    lines = result.out.splitlines()
    assert any("block_sparse_moe.experts.2.w2.weight" in l and "expert2:model.layers.1.mlp.down_proj.weight" in l
               for l in lines)
    # 1 embed + 2 layers x (6 shared + 3 experts x 3 + router) + norm + lm_head
    assert sum("<-" in l for l in lines) == 1 + 2 * (6 + 9 + 1) + 2


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_llama3_rope_scaling_is_kept(llama, tmp_path, run_cli):
    """A Llama-3.1-style scaled rope changes every position's angles: losing it changes logits."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama.base, base)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    _edit_config(base, rope_parameters=rope)
    recipe = write_recipe(tmp_path / "r.yml", base, [base, base], names=["a", "b"])
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_parameters"] == rope and cfg["rope_theta"] == 500000.0
    moe, _ = load(tmp_path / "out")
    dense, _ = load(base)
    plain, _ = load(llama.base)
    ids = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(dense(ids).logits, plain(ids).logits, atol=1e-4)  # the scaling matters


def test_mistral_sliding_window_is_kept(mistral, tmp_path, run_cli):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(mistral.base, base)
    _edit_config(base, sliding_window=4096)
    recipe = write_recipe(tmp_path / "r.yml", base, mistral.experts[:2])
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] == 4096


def test_tied_embeddings_base(tmp_path, tokenizer_dir, run_cli):
    from mergekit_mode.toy import make_model

    base = make_model(tmp_path / "base", tokenizer_dir=tokenizer_dir, tie_word_embeddings=True, seed=5)
    recipe = write_recipe(tmp_path / "r.yml", base, [base, base], names=["a", "b"], router={"mode": "noisy"})
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    moe, info = load(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    dense, _ = load(base)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
