"""LoRA adapters as experts, checked against peft itself.

Every adapter here is made by peft (get_peft_model with random, non-zero A and B, saved with
save_pretrained) and the reference is peft's own `merge_and_unload()` of the saved folder: the
MoE that the real CLI builds must hold exactly those weights (float32 rounding aside).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergekit_mode.build import plan_recipe
from mergekit_mode.inputs import TensorInfo, TensorReader
from mergekit_mode.toy.adapters import make_adapter
from mergekit_mode.toy.models import make_expert, make_model

MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
LAYERS = 2
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny float32 Llama base and two noisy full fine-tunes of it."""
    root = tmp_path_factory.mktemp("models")
    make_model(root / "base", vocab_size=128)
    make_expert(root / "base", root / "full1", seed=1, attn_scale=0.05)
    make_expert(root / "base", root / "full2", seed=2)
    return root


def peft_merged(stem: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The reference: peft loads the saved adapter and merges it."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stem), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def write_recipe(folder: Path, experts: list[dict], **extra: object) -> Path:
    recipe = folder / "recipe.yml"
    recipe.write_text(json.dumps({"base_model": "base", "experts": experts, **extra}))  # JSON is YAML
    return recipe


def build(folder: Path, experts: list[dict], run_cli, **extra: object) -> tuple[dict, str]:
    """Build with the real CLI; the output's tensors and the warnings printed."""
    out = folder / "out"
    result = run_cli(write_recipe(folder, experts, **extra), out, "-q", "--force")
    assert result.code == 0, result.err
    return load_file(out / "model.safetensors"), result.err


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


@pytest.fixture()
def work(models: Path, tmp_path: Path) -> Path:
    """A recipe folder that sees the shared models as ./base, ./full1, ./full2."""
    for name in ("base", "full1", "full2"):
        (tmp_path / name).symlink_to(models / name)
    return tmp_path


@pytest.mark.parametrize(
    "lora",
    [
        dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR),
        dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, rank_pattern={"layers.1.mlp.gate_proj": 2, "down_proj": 6},
             alpha_pattern={r"model\.layers\.0\.mlp\.up_proj": 3}),
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]),
        dict(r=2, lora_alpha=5, use_dora=True, use_rslora=True, target_modules=["gate_proj", "down_proj"],
             rank_pattern={"down_proj": 3}),
    ],
    ids=["lora", "rslora", "patterns", "dora", "dora-rslora-pattern"],
)
def test_adapter_expert_equals_peft_merge(work: Path, lora: dict, run_cli) -> None:
    make_adapter(work / "base", work / "code", seed=3, **lora)
    out, _ = build(work, [{"model": "full1"}, {"adapter": "code"}], run_cli)
    ref = peft_merged(work / "base", work / "code")
    for layer in range(LAYERS):
        for proj, mlp in MLP.items():
            close(out[f"model.layers.{layer}.block_sparse_moe.experts.1.{proj}.weight"],
                  ref[f"model.layers.{layer}.mlp.{mlp}.weight"])
        # one adapter expert: `average` gives its own attention change, divided by 1
        close(out[f"model.layers.{layer}.self_attn.q_proj.weight"], ref[f"model.layers.{layer}.self_attn.q_proj.weight"])


def test_merged_in_float32_then_cast(work: Path, run_cli) -> None:
    make_adapter(work / "base", work / "a", seed=18, r=4, lora_alpha=8, use_dora=True, target_modules=["gate_proj"])
    out, _ = build(work, [{"model": "full1"}, {"adapter": "a"}], run_cli, dtype="bfloat16")
    merged = out["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
    ref = peft_merged(work / "base", work / "a")["model.layers.0.mlp.gate_proj.weight"]
    assert merged.dtype == torch.bfloat16
    assert (merged != ref.to(torch.bfloat16)).float().mean() < 0.01  # a float32 ulp may flip a rounding


def test_average_is_mean_of_peft_merges(work: Path, run_cli) -> None:
    """`average`: base + mean over ALL adapter experts of their changes; one that leaves v_proj alone
    counts as zero change there; the full fine-tunes' attention (full1 has some) is not used."""
    make_adapter(work / "base", work / "a", seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
    make_adapter(work / "base", work / "b", seed=5, r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "up_proj"])
    experts = [{"model": "full1"}, {"model": "full2"}, {"adapter": "a"}, {"adapter": "b"}]
    out, _ = build(work, experts, run_cli)
    ref = [peft_merged(work / "base", work / name) for name in ("a", "b")]
    base = load_file(work / "base" / "model.safetensors")
    for layer in range(LAYERS):
        for proj in ("q_proj", "v_proj", "k_proj", "o_proj"):
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            close(out[key], (ref[0][key] + ref[1][key]) / 2)
        assert torch.equal(out[f"model.layers.{layer}.self_attn.k_proj.weight"],
                           base[f"model.layers.{layer}.self_attn.k_proj.weight"])

    key = "model.layers.0.self_attn.q_proj.weight"
    dropped, err = build(work, experts, run_cli, shared_deltas="drop")
    assert torch.equal(dropped[key], base[key])
    assert "shared_deltas: a's changes of 4 tensors are not used (first model.layers.0.self_attn.q_proj" in err
    from_b, err = build(work, experts, run_cli, shared_deltas={"from": "b"})
    close(from_b[key], ref[1][key])
    assert "a's changes of 4 tensors are not used" in err and "b's changes" not in err
    from_full, _ = build(work, experts, run_cli, shared_deltas={"from": "full1"})
    assert torch.equal(from_full[key], load_file(work / "full1" / "model.safetensors")[key])


def test_stem_merge_takes_adapter_experts_merged(work: Path, run_cli) -> None:
    """With `stem:` a mergekit merge, an adapter expert is a model of the merge with its adapter
    merged; shared_deltas/embeddings do not apply then; an adapter left out of stem.models is told."""
    make_adapter(work / "base", work / "a", seed=22, r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    experts = [{"model": "full1"}, {"adapter": "a"}, {"model": "full2"}]
    stem = {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": ["full1", "a"]}
    out, err = build(work, experts, run_cli, stem=stem)
    ref = peft_merged(work / "base", work / "a")
    full1 = load_file(work / "full1" / "model.safetensors")
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        close(out[key], (full1[key] + ref[key]) / 2)
    assert not [line for line in err.splitlines() if "has no tokenizer" not in line]  # this base has none
    _, err = build(work, experts, run_cli, stem={**stem, "models": ["full1", "full2"]})
    assert "stem.models: a's changes of 2 tensors are not used (first model.layers.0.self_attn.q_proj" in err
    result = run_cli("validate", write_recipe(work, experts, stem=stem, shared_deltas="drop"))
    assert result.code == 2 and "shared_deltas: applies with `stem: base` only" in result.err


def test_mixed_recipe_loads_in_transformers(work: Path, run_cli) -> None:
    make_adapter(work / "base", work / "a", seed=6, r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    make_adapter(work / "base", work / "b", seed=7, r=4, lora_alpha=8, use_dora=True, target_modules=["gate_proj"])
    experts = [{"model": "full1"}, {"adapter": "a", "name": "code"}, {"model": "full2"}, {"adapter": "b"}]
    build(work, experts, run_cli)
    model, info = AutoModelForCausalLM.from_pretrained(work / "out", output_loading_info=True)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 4
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    card = (work / "out" / "README.md").read_text()
    assert "LoRA `a` on the base" in card and "`b`: LoRA + DoRA, rank 4, alpha 8, scaling 2" in card
    assert "mean of the adapter experts' changes" in card


def test_adapter_on_a_fine_tune(work: Path, run_cli) -> None:
    """`model:` and `adapter:` together: the adapter merges into that fine-tune; an adapter recorded
    against another base gets a warning naming both."""
    make_adapter(work / "base", work / "a", seed=8, r=4, lora_alpha=8, target_modules=["gate_proj", "q_proj"])
    out, err = build(work, [{"model": "full2"}, {"model": "full1", "adapter": "a", "name": "x"}], run_cli)
    ref = peft_merged(work / "full1", work / "a")
    close(out["model.layers.1.block_sparse_moe.experts.1.w1.weight"], ref["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                       ref["model.layers.1.mlp.down_proj.weight"])
    # the shared q_proj gets the adapter's change only, not full1's own attention drift
    key = "model.layers.0.self_attn.q_proj.weight"
    full1 = load_file(work / "full1" / "model.safetensors")
    base = load_file(work / "base" / "model.safetensors")
    close(out[key], base[key] + (ref[key] - full1[key]))
    assert "experts[1].adapter: adapter_config.json records base" in err and "full1" in err


def test_fan_in_fan_out_ignored_as_peft_does(work: Path, run_cli) -> None:
    adapter = make_adapter(work / "base", work / "a", seed=9, r=4, lora_alpha=8, target_modules=["gate_proj", "q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    out, err = build(work, [{"model": "full1"}, {"adapter": "a"}], run_cli)
    ref = peft_merged(work / "base", adapter)
    close(out["model.layers.0.block_sparse_moe.experts.1.w1.weight"], ref["model.layers.0.mlp.gate_proj.weight"])
    assert "fan_in_fan_out is true; peft ignores it" in err


def test_embeddings_need_a_policy(work: Path, run_cli) -> None:
    """LoRA (with DoRA: the transposed, column-norm case) on embed_tokens and lm_head in
    modules_to_save: refused without `embeddings`, the expert's with {from:}, the base's with base."""
    make_adapter(work / "base", work / "a", seed=10, r=4, lora_alpha=8, use_dora=True,
                 target_modules=["embed_tokens", "gate_proj"], modules_to_save=["lm_head"])
    experts = [{"model": "full1"}, {"adapter": "a"}]
    result = run_cli(write_recipe(work, experts), work / "out")
    assert result.code == 2 and "experts[1].adapter: changes model.embed_tokens.weight" in result.err
    assert "set `embeddings: base` or `embeddings: {from: a}`" in result.err
    out, _ = build(work, experts, run_cli, embeddings={"from": "a"})
    ref = peft_merged(work / "base", work / "a")
    close(out["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    close(out["lm_head.weight"], ref["lm_head.weight"])
    base = load_file(work / "base" / "model.safetensors")
    kept, err = build(work, experts, run_cli, embeddings="base")
    assert "embeddings: a's changes of 2 tensors are not used" in err
    assert torch.equal(kept["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(kept["lm_head.weight"], base["lm_head.weight"])


def test_tied_base_has_no_lm_head_to_take(tmp_path: Path, run_cli) -> None:
    make_model(tmp_path / "base", vocab_size=128, tie_word_embeddings=True)
    make_expert(tmp_path / "base", tmp_path / "full", seed=1)
    make_adapter(tmp_path / "base", tmp_path / "a", seed=21, r=4, lora_alpha=8, target_modules=["lm_head", "gate_proj"])
    experts = [{"model": "full"}, {"adapter": "a"}]
    result = run_cli("validate", write_recipe(tmp_path, experts, embeddings={"from": "a"}))
    assert result.code == 2 and "embeddings.from: the base ties lm_head to embed_tokens, so a's change" in result.err
    result = run_cli("validate", write_recipe(tmp_path, experts))
    assert result.code == 2 and "experts[1].adapter: changes lm_head.weight" in result.err
    out, _ = build(tmp_path, experts, run_cli, embeddings="base")
    assert "lm_head.weight" not in out


def test_saved_modules_are_the_experts_own(work: Path, run_cli) -> None:
    """modules_to_save outside the embeddings: a saved MLP projection is the expert's; a saved norm
    is a change like any other and is averaged (here over 2 adapter experts)."""
    adapter = work / "a"
    torch.manual_seed(16)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "base"), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj"],
        modules_to_save=["up_proj", "post_attention_layernorm"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(adapter)
    make_adapter(work / "base", work / "b", seed=17, r=2, lora_alpha=2, target_modules=["down_proj"])
    out, _ = build(work, [{"model": "full1"}, {"adapter": "a"}, {"adapter": "b"}], run_cli)
    ref = peft_merged(work / "base", adapter)
    base = load_file(work / "base" / "model.safetensors")
    for layer in range(LAYERS):
        for proj, mlp in MLP.items():
            close(out[f"model.layers.{layer}.block_sparse_moe.experts.1.{proj}.weight"],
                  ref[f"model.layers.{layer}.mlp.{mlp}.weight"])
        key = f"model.layers.{layer}.post_attention_layernorm.weight"
        close(out[key], (ref[key] + base[key]) / 2)


def test_reads_follow_the_plan_order(work: Path, run_cli, monkeypatch) -> None:
    """The prefetcher reads Plan.reads() ahead in order; the executor must ask in exactly that order
    (a mismatch would silently read everything twice). Covers LoraMerge, DoRA and Mean over an
    adapter on a fine-tune."""
    make_adapter(work / "base", work / "a", seed=19, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])
    make_adapter(work / "base", work / "b", seed=20, r=2, lora_alpha=4, target_modules=["q_proj", "gate_proj"])
    recipe = write_recipe(work, [{"model": "full1"}, {"adapter": "a"}, {"adapter": "b", "model": "full2"}])
    plan = plan_recipe(recipe)
    calls: list[TensorInfo] = []
    original = TensorReader.read
    monkeypatch.setattr(TensorReader, "read", lambda self, info: calls.append(info) or original(self, info))
    assert run_cli(recipe, work / "out", "-q").code == 0
    assert calls == plan.reads()


def test_dry_run_shows_merges(work: Path, run_cli) -> None:
    make_adapter(work / "base", work / "a", seed=11, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])
    result = run_cli(write_recipe(work, [{"model": "full1"}, {"adapter": "a"}]), work / "out", "--dry-run")
    assert result.code == 0, result.err
    text = result.out
    assert "experts.1.w3.weight" in text
    assert "base_model:model.layers.0.mlp.up_proj.weight + lora a (scale 2, dora)" in text
    assert "base_model:model.layers.1.self_attn.q_proj.weight + (Δa) / 1" in text
    assert not (work / "out").exists()


def _edit_config(adapter: Path, **changes: object) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def _add_lora_bias(adapter: Path, value: float) -> None:
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        tensors[key.replace(".weight", ".bias")] = torch.full((tensors[key].shape[0],), value)
    save_file(tensors, file)
    _edit_config(adapter, lora_bias=True)


def _to_bin(adapter: Path) -> None:
    file = adapter / "adapter_model.safetensors"
    torch.save(load_file(file), adapter / "adapter_model.bin")
    file.unlink()


def _ia3(work: Path) -> None:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "base"),
                           IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(work / "a")


def _other_shape(work: Path) -> None:
    make_model(work / "wide", vocab_size=128, intermediate_size=96)
    make_adapter(work / "wide", work / "a", seed=12, r=4, lora_alpha=8, target_modules=["gate_proj"])


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda w: _ia3(w), "experts[1].adapter: " + "{a}/adapter_config.json: peft_type 'IA3' is not supported"),
        (lambda w: _to_bin(w / "a"), "adapter_model.bin is a pickle"),
        (lambda w: _edit_config(w / "a", r=8), "do not have rank r=8"),
        (lambda w: _edit_config(w / "a", use_dora=True), "use_dora is True but the magnitude vector is missing"),
        (lambda w: _edit_config(w / "a", init_lora_weights="pissa"), "init_lora_weights 'pissa' changes the base"),
        (lambda w: _edit_config(w / "a", alora_invocation_tokens=[1, 2]), "alora_invocation_tokens is set"),
        (lambda w: _edit_config(w / "a", use_future_variant=True), "use_future_variant is not an option of the "
                                                                    "installed peft"),
        (lambda w: _edit_config(w / "a", layers_pattern="layers"), "adapter_config.json: not a valid LoRA config"),
        (lambda w: _edit_config(w / "a", rank_pattern={"gate_proj": "4"}),
         "adapter_config.json: rank_pattern['gate_proj'] must be a positive integer, not '4'"),
        (lambda w: _add_lora_bias(w / "a", 0.5), "non-zero LoRA bias (lora_bias=True) on "
                                                 "model.layers.0.mlp.gate_proj.weight; LoRA biases are not merged"),
        (lambda w: _other_shape(w), "experts[1].adapter: LoRA on model.layers.0.mlp.gate_proj fits a weight of shape "
                                    "[96, 64], {base} has [128, 64]"),
        (lambda w: (w / "a" / "adapter_config.json").unlink(), "adapter_config.json does not exist"),
    ],
    ids=["ia3", "bin", "rank", "dora-missing", "pissa", "alora", "unknown-option", "bad-config", "rank-text",
         "lora-bias", "shape", "no-config"],
)
def test_bad_adapters_exit_2(work: Path, spoil, message: str, run_cli) -> None:
    make_adapter(work / "base", work / "a", seed=13, r=4, lora_alpha=8, target_modules=["gate_proj"])
    spoil(work)
    recipe = write_recipe(work, [{"model": "full1"}, {"adapter": "a"}])
    for command in (["validate", recipe], [recipe, work / "out"]):
        result = run_cli(*command)
        assert result.code == 2, result.err
        assert message.replace("{a}", str(work / "a")).replace("{base}", str(work / "base")) in result.err
    assert not (work / "out").exists()


def test_zero_lora_bias_is_accepted(work: Path, run_cli) -> None:
    make_adapter(work / "base", work / "a", seed=14, r=4, lora_alpha=8, target_modules=["gate_proj"])
    ref = peft_merged(work / "base", work / "a")
    _add_lora_bias(work / "a", 0.0)
    out, _ = build(work, [{"model": "full1"}, {"adapter": "a"}], run_cli)
    close(out["model.layers.0.block_sparse_moe.experts.1.w1.weight"], ref["model.layers.0.mlp.gate_proj.weight"])


@pytest.mark.parametrize(
    "experts, extra, message",
    [
        ([{"model": "full1"}, {"name": "x"}], {}, "experts[1]: give model:, adapter: or both"),
        ([{"model": "full1"}, {"adapter": "a"}], {"shared_deltas": {"from": "zz"}},
         "shared_deltas.from: 'zz' is not the name of an expert (full1, a)"),
        ([{"model": "full1"}, {"adapter": "a"}], {"shared_deltas": "mean"},
         "shared_deltas: use average or drop or {from: <expert name>}, not 'mean'"),
        ([{"model": "full1"}, {"adapter": "a"}], {"embeddings": {"from": "zz"}}, "embeddings.from: 'zz' is not"),
        ([{"model": "full1"}, {"adapter": "missing"}], {}, "experts[1].adapter: folder {w}/missing does not exist"),
    ],
    ids=["neither", "shared-from", "shared-bad", "embeddings-from", "no-folder"],
)
def test_bad_recipes_exit_2(work: Path, experts, extra, message: str, run_cli) -> None:
    make_adapter(work / "base", work / "a", seed=15, r=4, lora_alpha=8, target_modules=["gate_proj"])
    result = run_cli("validate", write_recipe(work, experts, **extra))
    assert result.code == 2 and message.replace("{w}", str(work)) in result.err, result.err

