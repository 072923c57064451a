"""Qwen bases: Qwen3 -> Qwen3-MoE, Qwen2/2.5 -> Qwen2-MoE with its shared expert.

Checked against transformers (exact keys, the dense base's logits) and against MoE blocks written
out here from the experts' own files, the way docs/formats.md states them:
  Qwen3-MoE: softmax over all experts, top-k, rescaled to sum to 1, weighted sum of the k experts;
  Qwen2-MoE: the same without the rescaling, plus sigmoid(gate . x) * shared(x), where shared is
  zero (shared_expert: none), the base's MLP (base) or an expert's ({from: name}).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mergekit_mode.toy import make_model, write_corpus
from mergekit_mode.toy.adapters import make_adapter
from tests.conftest import Family, write_recipe
from tests.test_build import load, mlp, read_tensor
from tests.test_errors import expect_error

NAMES = ["a", "b", "c"]
LAYERS = 2
HIDDEN = 64


def build(run_cli, tmp_path: Path, fam: Family, out: str = "out", **extra) -> Path:
    recipe = write_recipe(tmp_path / f"{out}.yml", fam.base, fam.experts, names=NAMES, **extra)
    result = run_cli(recipe, tmp_path / out, "-q")
    assert result.code == 0, result.err
    return tmp_path / out


def keys(folder: Path) -> set[str]:
    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
    return names


def expected_keys(arch: str, tied: bool, experts: int = 3) -> set[str]:
    """The tensors of Qwen's own MoE checkpoints, written out by hand."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not tied or arch == "qwen2":  # Qwen2-MoE always has its own lm_head (llama.cpp needs it)
        names.add("lm_head.weight")
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "mlp.gate.weight"}
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"mlp.experts.{e}.{x}_proj.weight" for e in range(experts) for x in ("gate", "up", "down")}
        if arch == "qwen3":
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        else:
            names |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
            names |= {p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")}
            names.add(p + "mlp.shared_expert_gate.weight")
    return names


def block(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.layers[layer].mlp(x)
    return out[0] if isinstance(out, tuple) else out


def reference_block(out: Path, layer: int, x: torch.Tensor, experts: list[Path], k: int, renormalise: bool,
                    shared=None) -> torch.Tensor:
    """The block as docs/formats.md says, from the experts' own dense files; `shared` computes the
    shared expert's MLP (None: no shared term at all)."""
    router = read_tensor(out, f"model.layers.{layer}.mlp.gate.weight")
    probs = torch.softmax(x @ router.T, dim=-1)
    top, index = probs.topk(k, dim=-1)
    if renormalise:
        top = top / top.sum(-1, keepdim=True)
    per_expert = torch.stack([mlp(e, layer, x) for e in experts])  # [E, B, T, H]
    y = sum(top[..., j, None] * torch.gather(per_expert, 0, index[None, ..., j, None].expand(1, *x.shape))[0]
            for j in range(k))
    if shared is not None:
        gate = read_tensor(out, f"model.layers.{layer}.mlp.shared_expert_gate.weight")
        y = y + torch.sigmoid(x @ gate.T) * shared(x)
    return y


def _x(seed: int) -> torch.Tensor:
    return torch.randn(3, 6, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("qwen3", False), ("qwen2", False), ("qwen2", True)])
def test_output_has_qwens_own_keys_and_loads_exactly(tmp_path, tokenizer_dir, run_cli, arch, tied):
    base = make_model(tmp_path / "base", arch, tokenizer_dir=tokenizer_dir, tie_word_embeddings=tied, seed=2)
    fam = Family(base, [base] * 3)
    out = build(run_cli, tmp_path, fam, router={"mode": "noisy", "experts_per_token": 2})
    assert keys(out) == expected_keys(arch, tied)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [{"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}[arch]]
    assert cfg["num_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    assert cfg["moe_intermediate_size"] == 128 and cfg["rope_parameters"]["rope_theta"] == 10000.0
    model, info = load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    if arch == "qwen2" and tied:  # untied in the output, with the embeddings as lm_head
        assert not cfg["tie_word_embeddings"]
        assert torch.equal(read_tensor(out, "lm_head.weight"), read_tensor(base, "model.embed_tokens.weight"))


@pytest.mark.parametrize("family,router", [("qwen3", "gateless"), ("qwen3", "noisy"), ("qwen2", "gateless")])
def test_copies_of_the_base_reproduce_its_logits(request, tmp_path, run_cli, family, router):
    """The stem (Qwen2's biases, Qwen3's q/k norms and tied embeddings, rope 1e6) is the base's: with
    every expert the base's MLP the MoE is the dense model. (Qwen2-MoE top-2 is not: its k weights
    sum to less than 1.)"""
    fam = request.getfixturevalue(family)
    out = build(run_cli, tmp_path, Family(fam.base, [fam.base] * 3), router={"mode": router})
    moe, _ = load(out)
    dense, _ = load(fam.base)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_qwen3_moe_block_is_the_renormalised_top_k_mixture(qwen3, tmp_path, run_cli):
    out = build(run_cli, tmp_path, qwen3, router={"mode": "noisy", "experts_per_token": 2, "std": 0.5})
    moe, _ = load(out)
    x = _x(1)
    for layer in range(LAYERS):
        expected = reference_block(out, layer, x, qwen3.experts, 2, renormalise=True)
        torch.testing.assert_close(block(moe, layer, x), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shared", ["none", "base", "b"])
def test_qwen2_moe_block_adds_the_shared_expert_to_the_unnormalised_mixture(qwen2, tmp_path, run_cli, shared):
    policy = {"from": shared} if shared in NAMES else shared
    out = build(run_cli, tmp_path, qwen2, shared_expert=policy,
                router={"mode": "noisy", "experts_per_token": 2, "std": 0.5})
    moe, _ = load(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_topk_prob"] is False  # llama.cpp's qwen2moe never rescales the top-k weights
    source = {"none": None, "base": qwen2.base, "b": qwen2.experts[1]}[shared]
    x = _x(2)
    for layer in range(LAYERS):
        gate = read_tensor(out, f"model.layers.{layer}.mlp.shared_expert_gate.weight")
        assert gate.abs().max() < 1e-3 and bool(gate.all())  # sigmoid about 0.5; never an exact zero
        if source is None:
            assert cfg["shared_expert_intermediate_size"] == 32
            assert not read_tensor(out, f"model.layers.{layer}.mlp.shared_expert.down_proj.weight").any()
            shared_mlp = lambda v: torch.zeros_like(v)  # noqa: E731
        else:
            assert cfg["shared_expert_intermediate_size"] == 128
            shared_mlp = lambda v, s=source, l=layer: mlp(s, l, v)  # noqa: E731
        expected = reference_block(out, layer, x, qwen2.experts, 2, renormalise=False, shared=shared_mlp)
        torch.testing.assert_close(block(moe, layer, x), expected, rtol=1e-4, atol=1e-6)


def test_qwen2_moe_gateless_without_shared_expert_is_the_mean_of_the_experts(qwen2, tmp_path, run_cli):
    out = build(run_cli, tmp_path, qwen2)
    moe, _ = load(out)
    x = _x(3)
    for layer in range(LAYERS):
        expected = torch.stack([mlp(e, layer, x) for e in qwen2.experts]).mean(0)
        torch.testing.assert_close(block(moe, layer, x), expected, rtol=1e-4, atol=1e-6)


def _copy_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case", ["qwen2-to-mixtral", "qwen3-to-mixtral", "llama-to-qwen2", "llama-to-qwen3",
                                  "qwen3-to-qwen2", "expert-family", "shared-on-mixtral", "gemma", "phi3",
                                  "qwen3-bias", "qwen2-sliding", "unknown-format", "shared-from-nobody"])
def test_mismatches_are_refused_before_anything_is_written(llama, qwen2, qwen3, tmp_path, run_cli, case):
    fams = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}
    base_name = case.split("-")[0] if case.split("-")[0] in fams else {"expert-family": "qwen2",
                                                                       "shared-on-mixtral": "llama"}.get(case, "qwen2")
    fam = fams[base_name]
    base, experts, extra = fam.base, fam.experts, {}
    if "-to-" in case:
        extra["output"] = {"architecture": {"mixtral": "mixtral", "qwen2": "qwen2_moe",
                                            "qwen3": "qwen3_moe"}[case.split("-to-")[1]]}
    expected = {
        "qwen2-to-mixtral": ["output.architecture: mixtral takes llama, mistral bases", "qwen2 model (q/k/v biases)",
                             "qwen2_moe"],
        "qwen3-to-mixtral": ["output.architecture: mixtral", "qwen3 model (q/k norms)", "qwen3_moe"],
        "llama-to-qwen2": ["output.architecture: qwen2_moe takes qwen2 bases", "a llama model", "mixtral"],
        "llama-to-qwen3": ["output.architecture: qwen3_moe takes qwen3 bases", "a llama model", "mixtral"],
        "qwen3-to-qwen2": ["output.architecture: qwen2_moe takes qwen2 bases", "a qwen3 model", "qwen3_moe"],
        "expert-family": ["experts[1].model", "model_type 'qwen3'", "'qwen2'"],
        "shared-on-mixtral": ["shared_expert: mixtral has no shared expert", "qwen2_moe"],
        "gemma": ["base_model: model_type 'gemma'", "GELU", "no output format"],
        "phi3": ["base_model: model_type 'phi3'", "fused qkv_proj", "no output format"],
        "qwen3-bias": ["base_model: attention_bias is True"],
        "qwen2-sliding": ["base_model: use_sliding_window is True"],
        "unknown-format": ["output.architecture", "mixtral", "qwen2_moe", "qwen3_moe"],
        "shared-from-nobody": ["shared_expert.from: 'nobody' is not the name of an expert (x, y, z)"],
    }[case]
    if case == "expert-family":
        experts = [qwen2.experts[0], qwen3.experts[0]]
    elif case == "shared-on-mixtral":
        extra["shared_expert"] = "base"
    elif case in ("gemma", "phi3"):
        base = _copy_config(qwen2.base, tmp_path / case, model_type=case)
    elif case == "qwen3-bias":
        base = _copy_config(qwen3.base, tmp_path / case, attention_bias=True)
    elif case == "qwen2-sliding":
        base = _copy_config(qwen2.base, tmp_path / case, use_sliding_window=True)
    elif case == "unknown-format":
        extra["output"] = {"architecture": "qwen9_moe"}
    elif case == "shared-from-nobody":
        extra["shared_expert"] = {"from": "nobody"}
    recipe = write_recipe(tmp_path / "r.yml", base, experts, names=["x", "y", "z"][:len(experts)], **extra)
    expect_error(run_cli("validate", recipe), *expected)
    expect_error(run_cli(recipe, tmp_path / "out"), *expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_lora_experts_equal_peft_merge(request, tmp_path, run_cli, family):
    """A LoRA expert's MLP is peft's merge_and_unload; with one adapter expert the shared attention
    (shared_deltas: average) is that adapter's merged q/v weights, and Qwen2's biases stay the base's."""
    fam = request.getfixturevalue(family)
    adapter = make_adapter(fam.base, tmp_path / "lora", seed=5, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    recipe = tmp_path / "r.yml"
    experts = [{"name": "full", "model": str(fam.experts[0])}, {"name": "lora", "adapter": str(adapter)}]
    recipe.write_text(yaml.safe_dump({"base_model": str(fam.base), "experts": experts}))
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32),
                                       adapter).merge_and_unload().state_dict()
    out = tmp_path / "out"
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        for proj in ("gate", "up", "down"):
            torch.testing.assert_close(read_tensor(out, f"{p}mlp.experts.1.{proj}_proj.weight"),
                                       merged[f"{p}mlp.{proj}_proj.weight"], rtol=1e-6, atol=1e-6)
        for proj in ("q", "v"):
            torch.testing.assert_close(read_tensor(out, f"{p}self_attn.{proj}_proj.weight"),
                                       merged[f"{p}self_attn.{proj}_proj.weight"], rtol=1e-6, atol=1e-6)
            if family == "qwen2":
                assert torch.equal(read_tensor(out, f"{p}self_attn.{proj}_proj.bias"),
                                   read_tensor(fam.base, f"{p}self_attn.{proj}_proj.bias"))
    _, info = load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_stem_merge_takes_qwen2_biases_and_qwen3_norms(qwen2, qwen3, tmp_path, run_cli):
    """`stem:` merges the 1-D tensors Qwen adds too: a linear merge of a base and a changed copy."""
    for fam, name in ((qwen2, "self_attn.q_proj.bias"), (qwen3, "self_attn.q_norm.weight")):
        changed = tmp_path / f"{fam.base.parent.name}-changed"
        shutil.copytree(fam.base, changed)
        from safetensors.torch import load_file, save_file

        tensors = load_file(changed / "model.safetensors")
        for layer in range(LAYERS):
            tensors[f"model.layers.{layer}.{name}"] = tensors[f"model.layers.{layer}.{name}"] + 1.0
        save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
        recipe = tmp_path / "r.yml"
        recipe.write_text(yaml.safe_dump({
            "base_model": str(fam.base), "experts": [{"name": "a", "model": str(fam.experts[0])},
                                                     {"name": "b", "model": str(changed)}],
            "stem": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                          {"model": "b", "parameters": {"weight": 3.0}}]}}))
        out = tmp_path / f"out-{fam.base.parent.name}"
        assert run_cli(recipe, out, "-q").code == 0
        for layer in range(LAYERS):
            torch.testing.assert_close(read_tensor(out, f"model.layers.{layer}.{name}"),
                                       read_tensor(fam.base, f"model.layers.{layer}.{name}") + 0.75)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-texts")
    return {d: write_corpus(d, root / f"{d}.txt", 1500, seed=6) for d in ("arithmetic", "code", "prose")}


def _data_recipe(path: Path, fam: Family, texts: dict[str, Path], router: dict, **extra) -> Path:
    experts = [{"name": n, "model": str(e), "data": str(f)} for n, e, f in zip(texts, fam.experts, texts.values())]
    path.write_text(yaml.safe_dump({"base_model": str(fam.base), "experts": experts, "router": router, **extra}))
    return path


ROUTERS = {
    "hidden": {"mode": "hidden", "experts_per_token": 2, "max_tokens": 400},
    "trained-domain": {"mode": "trained", "experts_per_token": 2, "max_tokens": 400, "train": {"steps": 5}},
    "trained-lm": {"mode": "trained", "experts_per_token": 2, "max_tokens": 400,
                   "train": {"objective": "lm", "init": "zeros", "steps": 3, "batch_size": 2, "patience": 0}},
}


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_routers_from_data_change_only_the_gates(request, texts, tmp_path, run_cli, family, router):
    """hidden and trained routers on Qwen outputs: the build loads, and differs from gate-less only in
    the routers (and, with objective lm and a real shared expert, in the shared expert's gates)."""
    fam = request.getfixturevalue(family)
    extra = {"shared_expert": "base"} if family == "qwen2" else {}
    recipe = _data_recipe(tmp_path / "r.yml", fam, texts, ROUTERS[router], **extra)
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 0, result.err
    plain = _data_recipe(tmp_path / "plain.yml", fam, texts, {"mode": "gateless"}, **extra)
    assert run_cli(plain, tmp_path / "plain", "-q").code == 0
    _, info = load(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    changed = {n for n in keys(tmp_path / "out")
               if not torch.equal(read_tensor(tmp_path / "out", n), read_tensor(tmp_path / "plain", n))}
    routers = {f"model.layers.{layer}.mlp.gate.weight" for layer in range(LAYERS)}
    gates = {f"model.layers.{layer}.mlp.shared_expert_gate.weight" for layer in range(LAYERS)}
    assert routers <= changed
    assert changed - routers == (gates if router == "trained-lm" and family == "qwen2" else set())


def test_layer_streamed_qwen2_moe_equals_the_built_model(qwen2, tmp_path, run_cli):
    """The block the routers are trained in (the format's, layer by layer from the plan) is the one
    transformers runs: top-2 without rescaling plus the base as shared expert."""
    from mergekit_mode.build import plan_recipe
    from mergekit_mode.inputs import TensorReader
    from mergekit_mode.layerwise import LayerStream, PlanWeights, make_batches
    from mergekit_mode.plan import BASE
    from tests.test_routers_data import _sequences, assert_stream_matches, run_stream

    out = build(run_cli, tmp_path, qwen2, shared_expert="base", router={"mode": "noisy", "experts_per_token": 2,
                                                                         "std": 0.5})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plan = plan_recipe(tmp_path / "out.yml")
    cpu = torch.device("cpu")
    sequences = _sequences(2)

    def moe(index: int) -> torch.nn.Module:
        router = read_tensor(out, f"model.layers.{index}.mlp.gate.weight")
        gate = read_tensor(out, f"model.layers.{index}.mlp.shared_expert_gate.weight")
        return stream.moe(plan, index, router, gate)

    with TensorReader() as reader:
        stream = LayerStream(plan.inputs[BASE], PlanWeights(plan, reader, cpu), make_batches(sequences, 2), cpu)
        per_layer = run_stream(stream, moe)
    assert_stream_matches(model, sequences, 2, per_layer)


def test_eval_report_and_sweep_on_qwen_outputs(qwen2, qwen3, texts, tmp_path, run_cli):
    """eval counts Qwen routers (shares sum to k per layer), report plots them, sweep builds variants."""
    data = [arg for name, file in texts.items() for arg in ("--data", f"{name}={file}")]
    out = build(run_cli, tmp_path, qwen2, router={"mode": "noisy", "experts_per_token": 2, "std": 0.5})
    result = run_cli("eval", out, *data, "--json", "--ctx", "64")
    assert result.code == 0, result.err
    for domain in json.loads(result.out)["domains"].values():
        assert len(domain["routing"]) == LAYERS
        assert all(sum(row) == pytest.approx(2.0) for row in domain["routing"])
    # Qwen2-MoE's routers are found by --own-weight too: a domain named after expert "a" gets, per
    # layer, the weight of "a", which is at most its top-k share (the expert is in the top k only there).
    result = run_cli("eval", out, "--data", f"a={texts['arithmetic']}", "--json", "--ctx", "64", "--own-weight")
    assert result.code == 0, result.err
    domain = json.loads(result.out)["domains"]["a"]
    assert len(domain["own_weight"]["mean"]) == LAYERS
    for mean, not_chosen, shares in zip(domain["own_weight"]["mean"], domain["own_weight"]["not_chosen"],
                                        domain["routing"]):
        assert 0.0 < mean <= shares[0] and not_chosen == pytest.approx(1 - shares[0], abs=1e-6)
    result = run_cli("report", out, *data, "--ctx", "64", "--plot", tmp_path / "routing.png")
    assert result.code == 0, result.err and (tmp_path / "routing.png").stat().st_size > 0
    recipe = write_recipe(tmp_path / "sweep.yml", qwen3.base, qwen3.experts, names=list(texts),
                          router={"mode": "noisy", "experts_per_token": 2})
    result = run_cli("sweep", recipe, tmp_path / "sweep", "--router", "gateless,noisy", *data, "-q")
    assert result.code == 0, result.err
    # The domains are named after the experts, so the sweep scores each expert too (its own column)
    # and adds each variant's ratio to it.
    assert result.out.splitlines()[0].split() == ["domain", "gateless", "noisy", "expert"]
    assert "ratio to the domain's own expert" in result.out
    for mode, k in (("gateless", 3), ("noisy", 2)):
        cfg = json.loads((tmp_path / "sweep" / mode / "config.json").read_text())
        assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts_per_tok"] == k


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_eval_of_a_moe_of_base_copies_scores_as_the_base(request, texts, tmp_path, run_cli, family):
    """Through the tokenizers: `eval` reads the MoE folder with the tokenizer transformers picks for its
    model_type (qwen2_moe, qwen3_moe), the base with the one for qwen2/qwen3. A MoE whose experts are
    all the base must score the base's perplexity, token for token."""
    fam = request.getfixturevalue(family)
    out = build(run_cli, tmp_path, Family(fam.base, [fam.base] * 3), router={"mode": "gateless"})
    data = ["--data", f"prose={texts['prose']}", "--json", "--ctx", "64"]
    scores = []
    for model in (fam.base, out):
        result = run_cli("eval", model, *data)
        assert result.code == 0, result.err
        scores.append(json.loads(result.out)["domains"]["prose"])
    assert scores[0]["tokens"] == scores[1]["tokens"]
    assert scores[1]["perplexity"] == pytest.approx(scores[0]["perplexity"], rel=1e-4)
