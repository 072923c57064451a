"""Routers from data: the layer-streamed forward, hidden rows and trained routers, checked against
full transformers models run independently (hooks on each layer's post_attention_layernorm)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_mode.calibration import tokenize_documents
from mergekit_mode.inputs import ModelFolder, TensorReader
from mergekit_mode.build import plan_recipe
from mergekit_mode.layerwise import FolderWeights, LayerStream, PlanWeights, make_batches
from mergekit_mode.plan import BASE
from mergekit_mode.toy import make_expert, make_model, write_corpus
from mergekit_mode.toy.adapters import make_adapter
from tests.test_build import read_tensor


def full_model_router_inputs(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(router inputs, layer outputs) of every layer for one unpadded sequence, from the whole model."""
    router_inputs: list[torch.Tensor] = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda _m, _i, out: router_inputs.append(out[0]))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    # hidden_states[l + 1] is layer l's output, except the last, which has the final norm applied
    return router_inputs, [h[0] for h in out.hidden_states[1:-1]]


def run_stream(stream: LayerStream, mlp=lambda index: None) -> list[tuple[list, list]]:
    """(hidden states, router inputs) per layer, each a list over the stream's batches."""
    hidden = stream.embed()
    per_layer = []
    for index in range(stream.num_layers):
        hidden, router_inputs = stream.run(stream.decoder_layer(index, mlp(index)), hidden)
        per_layer.append((hidden, router_inputs))
    return per_layer


def assert_stream_matches(model, sequences: list[list[int]], batch_size: int, per_layer) -> None:
    """Every real token of every batch row equals the whole model run on that sequence alone."""
    for s, ids in enumerate(sequences):
        batch, row = divmod(s, batch_size)
        expected_router, expected_out = full_model_router_inputs(model, ids)
        for index, (hidden, router_inputs) in enumerate(per_layer):
            n = len(ids)
            torch.testing.assert_close(router_inputs[batch][row, :n], expected_router[index], rtol=1e-5, atol=1e-5)
            if index < len(per_layer) - 1:
                torch.testing.assert_close(hidden[batch][row, :n], expected_out[index], rtol=1e-5, atol=1e-5)


def _sequences(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (17, 9, 12, 1, 17)]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_layer_stream_equals_full_forward(tmp_path, tokenizer_dir, arch):
    """Right-padded batches, layer by layer, give the full model's numbers for every real token
    (Mistral with a sliding window shorter than the sequences, so the window mask matters)."""
    base = make_model(tmp_path / arch, arch, num_layers=3, tokenizer_dir=tokenizer_dir, seed=3,
                      sliding_window=5 if arch == "mistral" else None)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    sequences = _sequences()
    with TensorReader() as reader:
        folder = ModelFolder.open(base, "base")
        stream = LayerStream(folder, FolderWeights(folder, reader), make_batches(sequences, 3), torch.device("cpu"))
        per_layer = run_stream(stream)
    assert_stream_matches(model, sequences, 3, per_layer)


@pytest.mark.parametrize("kind", ["stem-merge", "adapters"])
def test_layer_streamed_moe_equals_the_built_model(llama, tmp_path, run_cli, kind):
    """What objective `domain` runs (the output's own tensors computed on demand, the format's sparse
    block over the experts' MLPs) reproduces the written MoE in transformers, top-2: with a linear
    stem over experts whose attention differs, and with LoRA adapter experts (merged MLPs, and the
    mean of their attention changes in the stem)."""
    names = ["a", "b", "c"]
    if kind == "adapters":
        experts = [{"adapter": str(make_adapter(llama.base, tmp_path / n, seed=10 + i, r=4, lora_alpha=8,
                                                target_modules=["q_proj", "gate_proj", "down_proj"])), "name": n}
                   for i, n in enumerate(names)]
        extra = {}
    else:
        experts = [{"model": str(make_expert(llama.base, tmp_path / n, seed=10 + i, mlp_scale=0.5, attn_scale=0.5)),
                    "name": n} for i, n in enumerate(names)]
        extra = {"stem": {"merge_method": "linear",
                          "models": [{"model": n, "parameters": {"weight": w}} for n, w in zip(names, (1, 2, 3))]}}
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"base_model": str(llama.base), "experts": experts, **extra,
                                      "router": {"mode": "noisy", "experts_per_token": 2, "std": 0.5}}))
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 0, result.err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    plan = plan_recipe(recipe)
    sequences = _sequences(1)
    cpu = torch.device("cpu")

    def moe(index: int) -> torch.nn.Module:
        router = read_tensor(tmp_path / "out", f"model.layers.{index}.block_sparse_moe.gate.weight")
        return stream.moe(plan, index, router)

    with TensorReader() as reader:
        stream = LayerStream(plan.inputs[BASE], PlanWeights(plan, reader, cpu), make_batches(sequences, 2), cpu)
        per_layer = run_stream(stream, moe)
    assert_stream_matches(model, sequences, 2, per_layer)


def _domain_files(root: Path, domains: list[str], n_chars: int, seed: int) -> list[Path]:
    return [write_corpus(d, root / f"{d}.txt", n_chars, seed) for d in domains]


def _recipe(path: Path, base: Path, experts: list[dict], router: dict) -> Path:
    path.write_text(yaml.safe_dump({"base_model": str(base), "experts": experts, "router": router}, sort_keys=False))
    return path


def _documents(expert: dict) -> list[str]:
    """An expert's documents as the test reads them: its prompts, then its file's lines or records."""
    docs = list(expert.get("prompts", []))
    if "data" in expert:
        lines = [l for l in Path(expert["data"]).read_text().splitlines() if l.strip()]
        docs += [json.loads(l)["text"] for l in lines] if expert["data"].endswith(".jsonl") else lines
    return docs


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_hidden_rows_equal_full_model_computation(llama, tmp_path, run_cli, pooling):
    """Each row: mean over the expert's documents of the pooled router input (post_attention_layernorm
    output) of the base, minus the negatives' mean, L2-normalised; computed here with the whole model."""
    arith, dna = _domain_files(tmp_path, ["arithmetic", "dna"], 600, seed=2)
    code_jsonl = tmp_path / "code.jsonl"
    code = ["x = 1; y = x + 2", "for i in range(3): x += i"]
    code_jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in code))
    experts = [
        {"model": str(llama.experts[0]), "data": str(arith)},
        {"model": str(llama.experts[1]), "data": str(code_jsonl), "prompts": ["def f(a): return a"]},
        {"model": str(llama.experts[2]), "data": str(dna), "negative_prompts": ["12 + 3 = 15 ;", "the cat sees"]},
    ]
    recipe = _recipe(tmp_path / "r.yml", llama.base, experts, {"mode": "hidden", "pooling": pooling, "seq_len": 512})
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 0, result.err

    model = AutoModelForCausalLM.from_pretrained(llama.base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama.base)

    def pooled_mean(docs: list[str]) -> list[torch.Tensor]:
        per_doc = [full_model_router_inputs(model, tokenizer(d)["input_ids"])[0] for d in docs]
        pool = (lambda x: x[-1]) if pooling == "last" else (lambda x: x.mean(0))
        return [torch.stack([pool(doc[layer]) for doc in per_doc]).mean(0) for layer in range(2)]

    for e, expert in enumerate(experts):
        rows = pooled_mean(_documents(expert))
        if "negative_prompts" in expert:
            rows = [r - n for r, n in zip(rows, pooled_mean(expert["negative_prompts"]))]
        for layer, row in enumerate(rows):
            gate = read_tensor(tmp_path / "out", f"model.layers.{layer}.block_sparse_moe.gate.weight")
            torch.testing.assert_close(gate[e], row / row.norm(), rtol=1e-4, atol=1e-5)


def test_data_is_read_lazily_up_to_max_tokens(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pulled = []

    def docs():
        for i in range(10_000):
            pulled.append(i)
            yield "1 + 2 = 3 ; 4 * 5 = 20 ;"

    pieces = tokenize_documents(docs(), tokenizer, max_tokens=50, seq_len=8)
    assert sum(len(p) for p in pieces) == 50
    assert max(len(p) for p in pieces) <= 8
    assert len(pulled) < 10  # a few documents, not the whole stream


def test_trained_domain_router_routes_separable_domains(llama, tmp_path, run_cli):
    """Two domains with disjoint alphabets (arithmetic, DNA), top-1: on fresh text of each domain,
    at least 90% of the tokens go to that domain's expert in every layer. Measured: 99.9%/99.3%
    (arithmetic) and 95.7%/96.2% (DNA, layers 0/1); what DNA loses is its BOS tokens, which both
    domains share (6.5% of DNA's tokens, its documents are short)."""
    train = _domain_files(tmp_path / "train", ["arithmetic", "dna"], 6000, seed=1)
    test = _domain_files(tmp_path / "test", ["arithmetic", "dna"], 2000, seed=9)
    experts = [{"model": str(m), "name": n, "data": str(f)}
               for m, n, f in zip(llama.experts, ["arithmetic", "dna"], train)]
    router = {"mode": "trained", "experts_per_token": 1, "train": {"objective": "domain", "steps": 100}}
    result = run_cli(_recipe(tmp_path / "r.yml", llama.base, experts, router), tmp_path / "out", "-q")
    assert result.code == 0, result.err
    assert "held-out routing accuracy" in result.err
    result = run_cli("eval", tmp_path / "out", "--data", f"arithmetic={test[0]}", "--data", f"dna={test[1]}", "--json")
    domains = json.loads(result.out)["domains"]
    for e, name in enumerate(["arithmetic", "dna"]):
        own_share = [row[e] for row in domains[name]["routing"]]
        assert min(own_share) >= 0.9, (name, own_share)


def test_trained_lm_changes_only_the_routers(llama, tmp_path, run_cli):
    files = _domain_files(tmp_path, ["arithmetic", "prose"], 1500, seed=1)
    experts = [{"model": str(m), "data": str(f)} for m, f in zip(llama.experts, files)]
    # patience 0: every step runs and the last routers are kept (early stopping could keep the zeros)
    router = {"mode": "trained", "train": {"objective": "lm", "init": "zeros", "steps": 5, "batch_size": 2,
                                           "patience": 0}}
    assert run_cli(_recipe(tmp_path / "lm.yml", llama.base, experts, router), tmp_path / "lm", "-q").code == 0
    gateless = _recipe(tmp_path / "g.yml", llama.base, experts, {"mode": "gateless", "experts_per_token": 2})
    assert run_cli(gateless, tmp_path / "g", "-q").code == 0
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    with safe_open(tmp_path / "g" / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
    for name in names:
        trained, zero = read_tensor(tmp_path / "lm", name), read_tensor(tmp_path / "g", name)
        if name.endswith("gate.weight"):
            assert trained.abs().max() > 0  # moved away from the zero init
        else:
            torch.testing.assert_close(trained, zero, rtol=0, atol=0)
    assert config["num_experts_per_tok"] == 2


def _lm_routers(llama, tmp_path, run_cli, name: str, **train) -> tuple[list[torch.Tensor], str]:
    """(the routers, stderr) of an lm-trained build whose held-out check can never gain MIN_GAIN: lr 1e-4
    from zero routers moves the held-out loss by far less than 1e-3 nats a step."""
    files = _domain_files(tmp_path, ["arithmetic", "prose"], 4000, seed=1)
    experts = [{"model": str(m), "data": str(f)} for m, f in zip(llama.experts, files)]
    train = {"objective": "lm", "init": "zeros", "batch_size": 2, "lr": 1e-4, "held_out": 0.3, **train}
    result = run_cli(_recipe(tmp_path / f"{name}.yml", llama.base, experts, {"mode": "trained", "train": train}),
                     tmp_path / name)
    assert result.code == 0, result.err
    config = json.loads((tmp_path / name / "config.json").read_text())
    return [read_tensor(tmp_path / name, f"model.layers.{i}.block_sparse_moe.gate.weight")
            for i in range(config["num_hidden_layers"])], result.err


def test_lm_early_stopping_keeps_the_routers_of_the_best_check(llama, tmp_path, run_cli):
    """No check gains MIN_GAIN, so training stops after `patience` checks and keeps the routers of the
    check with the lowest held-out loss: the same bytes as a build of just that many steps with no
    early stopping (the checks draw none of training's random numbers)."""
    early, err = _lm_routers(llama, tmp_path, run_cli, "early", steps=40, check_every=1, patience=3)
    found = re.search(r"lm training stopped early at step (\d+) of 40: kept the routers of step (\d+)", err)
    assert found and int(found[1]) == 3, err
    kept = int(found[2])
    if kept == 0:  # the zero init itself
        assert all(not r.any() for r in early)
    else:
        reference, _ = _lm_routers(llama, tmp_path, run_cli, "reference", steps=kept, patience=0)
        assert all(torch.equal(a, b) for a, b in zip(early, reference))
        assert any(r.any() for r in early)


def test_lm_without_held_out_documents_runs_every_step(llama, tmp_path, run_cli):
    """held_out 0 leaves nothing to check: every step runs and the last routers are kept, as with patience 0."""
    every, err = _lm_routers(llama, tmp_path, run_cli, "every", steps=4, check_every=1, patience=1, held_out=0)
    reference, _ = _lm_routers(llama, tmp_path, run_cli, "reference", steps=4, patience=0, held_out=0)
    assert "lm training" not in err
    assert all(torch.equal(a, b) for a, b in zip(every, reference)) and any(r.any() for r in every)


def test_data_modes_need_data_on_every_expert(llama, tmp_path, run_cli):
    experts = [{"model": str(llama.experts[0]), "prompts": ["1 + 1 = 2"]}, {"model": str(llama.experts[1])}]
    result = run_cli(_recipe(tmp_path / "r.yml", llama.base, experts, {"mode": "hidden"}), tmp_path / "out")
    assert result.code == 2
    assert "experts[1]: router.mode hidden needs data: or prompts:" in result.err


def test_missing_data_file_is_a_one_line_error(llama, tmp_path, run_cli):
    experts = [{"model": str(m), "data": str(tmp_path / f"nope{i}.txt")} for i, m in enumerate(llama.experts[:2])]
    result = run_cli(_recipe(tmp_path / "r.yml", llama.base, experts, {"mode": "hidden"}), tmp_path / "out")
    assert result.code == 2
    assert result.err.strip().endswith("nope0.txt does not exist") and "experts[0].data" in result.err
    assert not (tmp_path / "out").exists()


def test_data_unused_by_the_router_mode_is_a_warning(llama, tmp_path, run_cli):
    experts = [{"model": str(m), "prompts": ["1 + 1 = 2"]} for m in llama.experts[:2]]
    result = run_cli("validate", _recipe(tmp_path / "r.yml", llama.base, experts, {"mode": "gateless"}))
    assert result.code == 0
    assert "not used by router.mode gateless" in result.err


@pytest.mark.parametrize("objective", ["domain", "lm"])
def test_trained_routers_are_deterministic(llama, tmp_path, run_cli, objective):
    """The same recipe and seed give the same bytes, as for every other router mode."""
    files = _domain_files(tmp_path, ["code", "prose"], 800, seed=1)
    experts = [{"model": str(m), "data": str(f)} for m, f in zip(llama.experts, files)]
    router = {"mode": "trained", "seed": 5, "train": {"objective": objective, "steps": 5, "batch_size": 2}}
    recipe = _recipe(tmp_path / "r.yml", llama.base, experts, router)
    for out in ("one", "two"):
        assert run_cli(recipe, tmp_path / out, "-q").code == 0
    one, two = ((tmp_path / out / "model.safetensors").read_bytes() for out in ("one", "two"))
    assert one == two


def test_domain_init_is_for_the_lm_objective(llama, tmp_path, run_cli):
    experts = [{"model": str(m), "prompts": ["1 + 1 = 2"]} for m in llama.experts[:2]]
    router = {"mode": "trained", "train": {"objective": "domain", "init": "domain"}}
    result = run_cli("validate", _recipe(tmp_path / "r.yml", llama.base, experts, router))
    assert result.code == 2
    assert "router.train: init domain applies to objective lm" in result.err


def test_steps_and_lr_apply_to_their_objective_and_the_domain_init_keeps_its_defaults():
    from mergekit_mode.router_modes import FIT_DEFAULTS, Fit, TrainSpec

    assert TrainSpec().fit("domain") == FIT_DEFAULTS["domain"]
    assert TrainSpec(objective="lm").fit("lm") == FIT_DEFAULTS["lm"] != FIT_DEFAULTS["domain"]
    lm = TrainSpec(objective="lm", init="domain", steps=7, lr=0.5)
    assert lm.fit("lm") == Fit(7, 0.5) and lm.fit("domain") == FIT_DEFAULTS["domain"]
    assert TrainSpec(steps=9).fit("domain") == Fit(9, FIT_DEFAULTS["domain"].lr)
