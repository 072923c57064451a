"""The layer-streamed model (streamed.py, layerwise.pack) against transformers' whole model: packed
rows give each sequence's own numbers, and one training step gives the loss of every output
format's transformers class (MixtralForCausalLM, Qwen3MoeForCausalLM, Qwen2MoeForCausalLM) and its
gradients with respect to every router and shared expert gate."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mergekit_mode.build import plan_recipe
from mergekit_mode.inputs import ModelFolder, TensorReader
from mergekit_mode.layerwise import FolderWeights, LayerStream, PlanWeights, pack
from mergekit_mode.plan import BASE
from mergekit_mode.streamed import MoeShape, StreamedLM
from mergekit_mode.toy import make_model
from mergekit_mode.toy.adapters import make_adapter
from tests.test_routers_data import full_model_router_inputs


def _sequences(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]


def test_pack_fills_rows_best_fit_decreasing():
    seqs = _sequences([9, 3, 7, 5, 1, 8])
    batches = pack(seqs, width=10, rows_per_batch=2)
    assert sorted(s for b in batches for s in b.seq.tolist()) == list(range(len(seqs)))
    for b in batches:
        assert torch.equal(b.seq, b.seq.sort().values)  # real tokens come sequence by sequence
        for s, row, start, n in zip(b.seq.tolist(), b.row.tolist(), b.start.tolist(), b.lengths.tolist()):
            assert b.ids[row, start:start + n].tolist() == seqs[s]
            assert b.positions[row, start:start + n].tolist() == list(range(n))
        assert b.real(b.ids[..., None])[:, 0].tolist() == [t for s in b.seq.tolist() for t in seqs[s]]
    # 33 tokens in rows of 10: 9+1, 8, 7+3, 5 -> four rows (best fit puts the 1 beside the 9)
    assert sum(len(b.ids) for b in batches) == 4


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_packed_rows_equal_each_sequence_alone(tmp_path, tokenizer_dir, arch):
    """Sequences sharing a row attend only to themselves with their own positions (Mistral with a
    sliding window shorter than the sequences; Qwen2's q/k/v biases, Qwen3's q/k norms)."""
    base = make_model(tmp_path / arch, arch, num_layers=2, tokenizer_dir=tokenizer_dir, seed=3,
                      sliding_window=4 if arch == "mistral" else None)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    sequences = _sequences([7, 3, 12, 1, 5, 9])
    folder = ModelFolder.open(base, "base")
    with TensorReader() as reader:
        stream = LayerStream(folder, FolderWeights(folder, reader), pack(sequences, 12, 2), torch.device("cpu"))
        assert any(b.packed for b in stream.batches)
        hidden = stream.embed()
        per_layer = []
        for index in range(stream.num_layers):
            hidden, router_inputs = stream.run(stream.decoder_layer(index), hidden)
            per_layer.append((hidden, router_inputs))
    for b_index, batch in enumerate(stream.batches):
        where = zip(batch.seq.tolist(), batch.row.tolist(), batch.start.tolist(), batch.lengths.tolist())
        for s, row, start, n in where:
            expected_router, expected_out = full_model_router_inputs(model, sequences[s])
            for index, (hidden, router_inputs) in enumerate(per_layer):
                torch.testing.assert_close(router_inputs[b_index][row, start:start + n], expected_router[index],
                                           rtol=1e-5, atol=1e-5)
                if index < len(per_layer) - 1:
                    torch.testing.assert_close(hidden[b_index][row, start:start + n], expected_out[index],
                                               rtol=1e-5, atol=1e-5)


def _transformers_step(model, sequences: list[list[int]], names: list[str]) -> tuple[float, list[torch.Tensor]]:
    """The transformers model's training loss (labels, attention mask, router logits) on the
    sequences right-padded one per row, and the gradient of each named parameter."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    model.zero_grad()
    params = [model.get_parameter(n) for n in names]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), output_router_logits=True)
    out.loss.backward()
    return float(out.loss.detach()), [p.grad.clone() for p in params]


# base family -> (the transformers class that must load the output, recipe extras)
FORMATS = {
    "llama": ("MixtralForCausalLM", {}),
    "qwen3": ("Qwen3MoeForCausalLM", {}),  # q/k norms, top-k rescaled
    "qwen2": ("Qwen2MoeForCausalLM", {"shared_expert": "base"}),  # q/k/v biases, shared expert and its gate
}


@pytest.mark.parametrize("family", list(FORMATS))
def test_streamed_training_step_equals_transformers_gradients(request, tmp_path, run_cli, family):
    """The layer-streamed forward-backward (packed rows, weights computed from the plan: two fine-tunes
    and a LoRA adapter, top-2 of 3) gives the loss and the router (and shared gate) gradients of the
    format's own transformers class loaded from the written model: streaming every layer, with every
    layer resident, and with some; twice, the second step on the layers the first left resident
    (which reads no weights at all when every layer is)."""
    fam = request.getfixturevalue(family)
    architecture, extra = FORMATS[family]
    adapter = make_adapter(fam.base, tmp_path / "lora", seed=7, r=4, lora_alpha=8,
                           target_modules=["gate_proj", "up_proj", "down_proj"])
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "base_model": str(fam.base),
        "experts": [{"name": "a", "model": str(fam.experts[0])}, {"name": "b", "model": str(fam.experts[1])},
                    {"name": "c", "adapter": str(adapter)}],
        "router": {"mode": "noisy", "experts_per_token": 2, "std": 0.5}, **extra}))
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(model).__name__ == architecture
    shared = "shared_expert" in extra
    names = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    names += [f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in range(2)] if shared else []
    sequences = _sequences([17, 5, 11, 3, 16, 8], seed=2)
    expected_loss, expected_grads = _transformers_step(model, sequences, names)

    plan = plan_recipe(recipe)
    cpu = torch.device("cpu")
    written = [model.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    routers, gates = written[:2], written[2:]
    if shared:  # a real shared gate: the written one is tiny, so the gate would hardly matter
        with torch.no_grad():
            for g in gates:
                g.normal_(0, 0.5)
        for g, n in zip(gates, names[2:]):
            model.get_parameter(n).data.copy_(g.detach())
        expected_loss, expected_grads = _transformers_step(model, sequences, names)
    batch = pack(sequences, 17, 8)[0]
    assert batch.packed
    reads_per_step, resident_modules = {}, {}
    whole = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    for resident in (0, whole // 2, 2 * whole):
        with TensorReader() as reader:
            stream = LayerStream(plan.inputs[BASE], PlanWeights(plan, reader, cpu), [], cpu, moe_format=plan.format,
                                 resident_bytes=resident)
            lm = StreamedLM(stream, MoeShape(3, 2), routers, gates or None)
            reads: list[str] = []
            stream._weight = _counting(stream._weight, reads)
            for _ in range(2):
                for g in written:
                    g.grad = None
                before = len(reads)
                loss = lm.train_step(batch, model.config.router_aux_loss_coef)
                reads_per_step.setdefault(resident, []).append(len(reads) - before)
                assert loss == pytest.approx(expected_loss, rel=1e-5), resident
                for got, expected in zip(written, expected_grads):
                    assert expected.abs().max() > 0
                    torch.testing.assert_close(got.grad, expected, rtol=1e-4, atol=1e-7)
            resident_modules[resident] = len(stream._resident)
    modules = resident_modules[2 * whole]
    assert resident_modules[0] == 0 < resident_modules[whole // 2] < modules, resident_modules
    assert reads_per_step[0][1] > 0 == reads_per_step[2 * whole][1], reads_per_step


def _counting(read, calls: list):
    def counted(name: str) -> torch.Tensor:
        calls.append(name)
        return read(name)
    return counted


def test_auto_compute_dtype_is_bfloat16_only_with_bf16_units(tmp_path, monkeypatch):
    from mergekit_mode import build

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert not build._cpu_has_bf16_units(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert build._cpu_has_bf16_units(info)
    assert not build._cpu_has_bf16_units(tmp_path / "absent")
    monkeypatch.setattr(build, "_cpu_has_bf16_units", lambda: False)
    assert build.compute_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(build, "_cpu_has_bf16_units", lambda: True)
    assert build.compute_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert build.compute_dtype("float32", torch.device("cpu")) == torch.float32


def test_bfloat16_eval_is_close_to_float32(llama, tmp_path, run_cli):
    """--compute-dtype bfloat16 runs the same model with bf16 weights and activations: perplexities
    within 2% of float32's, routing shares within 0.1."""
    from mergekit_mode.toy import write_corpus

    text = write_corpus("prose", tmp_path / "prose.txt", 1500, seed=3)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"base_model": str(llama.base),
                                      "experts": [{"model": str(e)} for e in llama.experts],
                                      "router": {"mode": "noisy", "experts_per_token": 2, "std": 0.5}}))
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    results = {}
    for dtype in ("float32", "bfloat16"):
        result = run_cli("eval", tmp_path / "out", "--data", f"prose={text}", "--json", "-q", "--compute-dtype", dtype)
        assert result.code == 0, result.err
        results[dtype] = json.loads(result.out)["domains"]["prose"]
    assert results["bfloat16"]["perplexity"] == pytest.approx(results["float32"]["perplexity"], rel=0.02)
    assert results["bfloat16"]["perplexity"] != results["float32"]["perplexity"]  # it did run in bf16
    routing = {dtype: torch.tensor(r["routing"]) for dtype, r in results.items()}
    torch.testing.assert_close(routing["bfloat16"], routing["float32"], atol=0.1, rtol=0)
