"""Greedy generation with vLLM, run by the vLLM virtualenv's python (not the project's).

usage: python vllm_generate.py JOBS.json OUT.json
JOBS.json: [{"name": str, "model": dir, "prompts": [[ids...], ...], "max_tokens": int}, ...]
OUT.json:  {name: {"ok": true, "tokens": [[ids...], ...], "load_s": float, "gen_s": float}
                | {"ok": false, "error": str}}
All models run in this one process, and vLLM's engine core and worker run inside it
(VLLM_ENABLE_V1_MULTIPROCESSING=0, distributed_executor_backend="uni"): measured on 2
cores, that loads a tiny model in 2-6 s instead of ~45 s with the default engine and
worker processes. Only the standard library and vLLM are imported here.
"""
import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process


def main():
    jobs = json.load(open(sys.argv[1]))
    out_path = sys.argv[2]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    results = {}
    for job in jobs:
        t0 = time.time()
        llm = None
        try:
            llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=256,
                      max_num_seqs=8, seed=0,
                      distributed_executor_backend="uni")  # worker in this process too
            t1 = time.time()
            sp = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], sp, use_tqdm=False)
            results[job["name"]] = {"ok": True, "tokens": [list(o.outputs[0].token_ids) for o in outs],
                                    "load_s": t1 - t0, "gen_s": time.time() - t1}
        except Exception as e:  # record and go on with the next model
            tb = traceback.format_exc().strip().splitlines()
            results[job["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                    "traceback": "\n".join(tb[-15:])}
        finally:
            if llm is not None:
                try:
                    llm.llm_engine.engine_core.shutdown()
                except Exception:
                    pass
            del llm
            gc.collect()
        with open(out_path, "w") as f:  # after each model, so a crash keeps what was done
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
