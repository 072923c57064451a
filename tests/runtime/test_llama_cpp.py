"""llama.cpp (llama-cpp-python) runs the folder as converted by llama.cpp's own
convert_hf_to_gguf.py (through mergekit_mode.gguf.export_gguf): logits match
transformers' and greedy continuations agree. llama.cpp runs in a subprocess
(runtimes.llama_cpp_run), so a crash in it fails one test and names the signal."""
from __future__ import annotations

import pytest

from mergekit_mode.gguf import export_gguf

from .runtimes import hf_greedy, hf_logits, hf_model, llama_cpp_converter, llama_cpp_run, prompts_for, rel_err

pytestmark = pytest.mark.runtime

N_NEW = 8
# max|llama.cpp - transformers| / max|transformers| over all positions and the vocab
TOL = {"f32": 1e-3, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}


def _check(moe_dir, tmp_path, outtype, greedy=True):
    llama_cpp_converter()  # fails with the setup command when missing
    gguf = export_gguf(moe_dir, tmp_path / f"model-{outtype}.gguf", outtype=outtype)
    prompts = prompts_for(moe_dir)
    got = llama_cpp_run(gguf, prompts, n_new=N_NEW if greedy else 0)
    model = hf_model(moe_dir)
    errs = []
    for ids, logits, tokens in zip(prompts, got.logits, got.greedy):
        ref = hf_logits(model, ids)
        assert logits.shape == ref.shape, (logits.shape, ref.shape)
        errs.append(rel_err(logits, ref))
        if greedy:
            assert tokens == hf_greedy(model, ids, N_NEW), ids
    print(f"\n[llama.cpp {outtype}] {moe_dir.name}: rel err max {max(errs):.2e} (tol {TOL[outtype]:.0e})")
    assert max(errs) < TOL[outtype], errs
    return max(errs)


def test_llama_cpp_f32_matches_transformers(moe_dir, tmp_path):
    _check(moe_dir, tmp_path, "f32")


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", ["llama-e4-gateless", "qwen2-e3-gateless"])
def test_export_gguf_outtypes_load(moe_dirs, tmp_path, outtype, name):
    """export_gguf's lossy outtypes load and stay close to the float32 reference (Qwen2-MoE's unused
    shared expert, 32 wide, quantizes too). On gate-less models: with a top-k router, rounding the
    weights can flip a token's expert choice, which is a real (not a conversion) difference from
    the float32 reference."""
    _check(moe_dirs[name], tmp_path, outtype, greedy=False)


def test_export_gguf_metadata(moe_dirs, tmp_path):
    """The GGUF says what llama.cpp will run: llama arch, expert counts, stacked experts."""
    llama_cpp_converter()
    import json
    import sys

    sys.path.insert(0, str(llama_cpp_converter().parent / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    d = moe_dirs["llama-e3-top2"]
    cfg = json.loads((d / "config.json").read_text())
    r = gguf.GGUFReader(export_gguf(d, tmp_path / "m.gguf", outtype="f32"))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith("model")}
    assert f["general.architecture"] == "llama"
    assert f["llama.expert_count"] == cfg["num_local_experts"]
    assert f["llama.expert_used_count"] == cfg["num_experts_per_tok"]
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg else cfg["rope_theta"])
    assert f["tokenizer.ggml.model"] == "llama"  # the sentencepiece path
    names = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    E, H, I = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    assert names["blk.0.ffn_gate_inp.weight"] == (H, E)
    assert names["blk.0.ffn_gate_exps.weight"] == (H, I, E)
    assert names["blk.0.ffn_down_exps.weight"] == (I, H, E)
    assert names["blk.0.ffn_up_exps.weight"] == (H, I, E)


@pytest.mark.parametrize("name, arch", [("qwen2-e4-top2-shared-base", "qwen2moe"), ("qwen3-e3-top2-tied", "qwen3moe")])
def test_export_gguf_metadata_qwen(moe_dirs, tmp_path, name, arch):
    """Qwen outputs go to llama.cpp's own Qwen MoE graphs, with the expert sizes and (Qwen2-MoE) the
    shared expert the config states, and the BPE tokenizer it knows."""
    import json
    import sys

    sys.path.insert(0, str(llama_cpp_converter().parent / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    d = moe_dirs[name]
    cfg = json.loads((d / "config.json").read_text())
    r = gguf.GGUFReader(export_gguf(d, tmp_path / "m.gguf", outtype="f32"))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre"))}
    assert f["general.architecture"] == arch
    assert f[f"{arch}.expert_count"] == cfg["num_experts"]
    assert f[f"{arch}.expert_used_count"] == cfg["num_experts_per_tok"]
    assert f[f"{arch}.expert_feed_forward_length"] == cfg["moe_intermediate_size"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    names = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    E, H, I = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert names["blk.0.ffn_gate_exps.weight"] == (H, I, E) and names["blk.0.ffn_gate_inp.weight"] == (H, E)
    if arch == "qwen2moe":
        S = cfg["shared_expert_intermediate_size"]
        assert f[f"{arch}.expert_shared_feed_forward_length"] == S
        assert names["blk.0.ffn_up_shexp.weight"] == (H, S) and names["blk.0.ffn_gate_inp_shexp.weight"] in ((H,), (H, 1))
        assert names["blk.0.attn_q.bias"] == (H,) and "output.weight" in names
    else:
        assert names["blk.0.attn_q_norm.weight"] == (cfg["head_dim"],)


def test_export_gguf_missing_converter(monkeypatch, tmp_path, moe_dirs):
    from mergekit_mode.gguf import ConverterNotFoundError

    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(tmp_path / "nope" / "convert_hf_to_gguf.py"))
    with pytest.raises(ConverterNotFoundError, match="setup-runtimes"):
        export_gguf(moe_dirs["llama-e3-top2"], tmp_path / "x.gguf")
    monkeypatch.delenv("LLAMA_CPP_CONVERTER")
    monkeypatch.setenv("MERGEKIT_MODE_RUNTIMES", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary llama-cpp-python llama-cpp-python"):
        export_gguf(moe_dirs["llama-e3-top2"], tmp_path / "x.gguf")


def test_cli_export_gguf_loads_in_llama_cpp(moe_dirs, tmp_path, run_cli):
    out = tmp_path / "m.gguf"
    result = run_cli("export-gguf", moe_dirs["mistral-e4-top2"], "--outtype", "q8_0", "--outfile", out)
    assert result.code == 0, result.err
    assert not list(tmp_path.glob(".*partial"))
    assert llama_cpp_run(out, [[1, 5, 9]]).n_vocab == 512
    assert run_cli("export-gguf", moe_dirs["mistral-e4-top2"], "--outfile", out).code == 2  # exists, no --force


def test_cli_export_gguf_ollama_modelfile_fits_its_gguf(moe_dirs, tmp_path, run_cli):
    """--ollama beside a real conversion: FROM names the GGUF written, every stop is a token of the
    GGUF's vocabulary, and the GGUF carries the chat template the TEMPLATE was converted from."""
    import json
    import shutil
    import sys

    from tests.test_ollama import CHATML, parse_modelfile

    model = tmp_path / "moe"
    shutil.copytree(moe_dirs["llama-e3-top2"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    result = run_cli("export-gguf", model, "--outtype", "f32", "--ollama")
    assert result.code == 0, result.err
    commands = parse_modelfile((tmp_path / "moe-f32.Modelfile").read_text())
    assert ("model", "./moe-f32.gguf") in commands and any(c == "template" for c, _ in commands)
    sys.path.insert(0, str(llama_cpp_converter().parent / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    fields = gguf.GGUFReader(tmp_path / "moe-f32.gguf").fields
    tokens = set(fields["tokenizer.ggml.tokens"].contents())
    stops = [value for command, value in commands if command == "stop"]
    assert stops and set(stops) <= tokens
    assert fields["tokenizer.chat_template"].contents() == CHATML
