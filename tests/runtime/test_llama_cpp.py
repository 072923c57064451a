"""llama.cpp (llama-cpp-python) runs the folder as converted by llama.cpp's own
convert_hf_to_gguf.py (through mergekit_mode.gguf.export_gguf): logits match
transformers' and greedy continuations agree."""
from __future__ import annotations

import numpy as np
import pytest

from mergekit_mode.gguf import export_gguf

from .runtimes import hf_greedy, hf_logits, hf_model, llama_cpp_converter, llama_cpp_module, prompts_for, rel_err

pytestmark = pytest.mark.runtime

N_NEW = 8
GGML_TYPE_F32 = 0  # llama_cpp.GGML_TYPE_F32; the default f16 KV cache alone gives ~3e-3 rel err
# max|llama.cpp - transformers| / max|transformers| over all positions and the vocab
TOL = {"f32": 1e-3, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}


def _llama(gguf_path, n_ctx=128):
    llama_cpp = llama_cpp_module()
    return llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                           n_threads=2, seed=0, verbose=False,
                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _llama_greedy(llm, ids, n_new):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _check(moe_dir, tmp_path, outtype, greedy=True):
    llama_cpp_converter()  # fails with the setup command when missing
    gguf = export_gguf(moe_dir, tmp_path / f"model-{outtype}.gguf", outtype=outtype)
    llm = _llama(gguf)
    model = hf_model(moe_dir)
    errs = []
    for ids in prompts_for(moe_dir):
        ref = hf_logits(model, ids)
        got = _llama_logits(llm, ids)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        errs.append(rel_err(got, ref))
        if greedy:
            assert _llama_greedy(llm, ids, N_NEW) == hf_greedy(model, ids, N_NEW), ids
    print(f"\n[llama.cpp {outtype}] {moe_dir.name}: rel err max {max(errs):.2e} (tol {TOL[outtype]:.0e})")
    assert max(errs) < TOL[outtype], errs
    return max(errs)


def test_llama_cpp_f32_matches_transformers(moe_dir, tmp_path):
    _check(moe_dir, tmp_path, "f32")


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_export_gguf_outtypes_load(moe_dirs, tmp_path, outtype):
    """export_gguf's lossy outtypes load and stay close to the float32 reference. On the
    gate-less model: with a top-k router, rounding the weights can flip a token's expert
    choice, which is a real (not a conversion) difference from the float32 reference."""
    _check(moe_dirs["llama-e4-gateless"], tmp_path, outtype, greedy=False)


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
    import llama_cpp

    out = tmp_path / "m.gguf"
    result = run_cli("export-gguf", moe_dirs["mistral-e4-top2"], "--outtype", "q8_0", "--outfile", out)
    assert result.code == 0, result.err
    assert not list(tmp_path.glob(".*partial"))
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False)
    assert llm.n_vocab() == 512
    assert run_cli("export-gguf", moe_dirs["mistral-e4-top2"], "--outfile", out).code == 2  # exists, no --force
