"""Run a GGUF in llama.cpp (llama-cpp-python) in a process of its own, for the runtime checks.

usage: python llama_cpp_run.py JOB.json OUT.npz
JOB.json: {"gguf": path, "prompts": [[ids...], ...], "n_new": int, "n_ctx": int}
OUT.npz:  n_vocab; logits_I [len(prompts[I]), n_vocab] float32 for each prompt I;
          greedy [len(prompts), n_new] int64 (argmax continuations; n_new 0: empty)

llama.cpp is native code: a crash in it (a SIGSEGV while loading a q8_0 file on some CPUs, see
docs/compatibility.md) must fail one test, not kill the whole pytest process, so the tests never
load a model in their own process. The KV cache is float32: llama.cpp's default f16 cache alone
gives ~3e-3 relative logit error, and these checks compare the weights, not the cache.
"""
import json
import sys

import numpy as np

GGML_TYPE_F32 = 0  # llama_cpp.GGML_TYPE_F32


def main() -> None:
    job = json.load(open(sys.argv[1]))
    import llama_cpp

    llm = llama_cpp.Llama(model_path=job["gguf"], logits_all=True, n_ctx=job["n_ctx"], n_batch=job["n_ctx"],
                          n_threads=2, seed=0, verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    out = {"n_vocab": np.array(llm.n_vocab())}
    greedy = []
    for i, ids in enumerate(job["prompts"]):
        llm.reset()
        llm.eval(ids)
        out[f"logits_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        tokens = []
        for _ in range(job["n_new"]):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        greedy.append(tokens)
    out["greedy"] = np.array(greedy, dtype=np.int64).reshape(len(job["prompts"]), job["n_new"])
    np.savez(sys.argv[2], **out)


if __name__ == "__main__":
    main()
