"""Speed and memory of `mergekit-mode` against `mergekit-moe`, measured in one run on one machine.

Makes a base and 4 experts of about 0.5B parameters each (bf16, ~1 GB each: hidden 2048,
intermediate 5632, 8 layers, vocab 32000; experts differ from the base in their MLPs), then times
in one run, each as a fresh process with its peak RSS taken from its rusage (the figure /usr/bin/time -v
prints):

- the I/O floor: reading the input bytes each tool reads and writing the output's bytes with plain
  file I/O (no tensors), the least any tool can do;
- mergekit-moe (gate_mode random or hidden, --out-shard-size 500M);
- mergekit-mode (router random or hidden, shard_size 500M).

With `--gate hidden` both tools run the base on the same 8 prompts per expert to make the
routers: mergekit-moe loads the whole base model for that; mergekit-mode streams it one decoder
layer at a time. Every run starts from the same page cache (`same_start`: dirty pages flushed, the
cache dropped where the user may, every input read once, untimed). Run by hand:

    python benchmarks/bench_merge.py [--workdir DIR] [--layers 8] [--gate random|hidden] [--keep] [--threads 1]

Targets: random, wall <= 0.6x mergekit-moe and <= 1.25x the floor (issue 13; 0.7x and 1.3x in
issue 2), peak RSS <= 0.25x mergekit-moe (issue 2); hidden, peak RSS <= 0.3x mergekit-moe's and
flat from 8 to 16 layers (issue 5), wall no slower than mergekit-moe's (issue 13). Both tools run
with --threads (OMP_NUM_THREADS, default 1).
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

import torch
import yaml
from safetensors.torch import save_file

from mergekit_mode.toy import DOMAINS, generate, train_tokenizer
from mergekit_mode.toy.tokenizer import copy_tokenizer

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 16


def config(layers: int) -> dict:
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None,
        "initializer_range": 0.02, "torch_dtype": "bfloat16",
    }


def make_model(folder: Path, layers: int, seed: int, base_seed: int) -> None:
    """Random bf16 weights; the stem is drawn from base_seed, the MLPs from seed."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config(layers)))
    stem = torch.Generator().manual_seed(base_seed)
    mlp = torch.Generator().manual_seed(seed)

    def rand(gen, *shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(stem, VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            tensors[f"{p}self_attn.{n}_proj.weight"] = rand(stem, HIDDEN, HIDDEN)
        tensors[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        tensors[p + "mlp.gate_proj.weight"] = rand(mlp, INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.up_proj.weight"] = rand(mlp, INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.down_proj.weight"] = rand(mlp, HIDDEN, INTERMEDIATE)
    tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = rand(stem, VOCAB, HIDDEN)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def same_start(inputs: list[str]) -> bool:
    """Put the page cache in the same state before each timed run: dirty pages written, the cache
    dropped where allowed (root), then every input read once. Writes slow down by 15-40% here once
    earlier outputs fill the cache (the kernel must reclaim pages), so without this the tool run
    later pays for the runs before it. False when the cache could not be dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        dropped = True
    except OSError:
        dropped = False
    for f in inputs:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return dropped


def timed(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, stdout) of a command run as a fresh process. Dirty pages of
    the previous run are flushed first, so no tool pays for another's writes."""
    os.sync()
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        # the child's own rusage, as /usr/bin/time -v reads it (which not every machine has)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return wall, usage.ru_maxrss / 1e6, stdout  # ru_maxrss: kilobytes on Linux


FLOOR = """
import os, sys
reads, out, size = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
buf = bytearray(64 << 20)
for f in reads:
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
chunk = bytes(64 << 20)
with open(out, "wb") as fh:
    left = size
    while left > 0:
        left -= fh.write(chunk[: min(left, len(chunk))])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where models are made (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--gate", choices=["random", "hidden"], default="random", help="router of both tools")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of both tools (on a shared 2-core machine two threads spin on each other)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mkmode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    models = work / f"models-L{args.layers}"
    names = ["base"] + [f"expert{i}" for i in range(args.experts)]
    if not (models / "done").exists():
        shutil.rmtree(models, ignore_errors=True)
        for i, name in enumerate(names):
            t = time.perf_counter()
            make_model(models / name, args.layers, seed=i, base_seed=0)
            print(f"made {name} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        # mergekit-moe loads the base's tokenizer; a small sentencepiece one will do.
        tok = train_tokenizer([generate(d, 4000, seed=0) for d in DOMAINS], work / "tokenizer")
        copy_tokenizer(tok, models / "base")
        (models / "done").touch()

    prompts = {n: [generate(DOMAINS[i % len(DOMAINS)], 400, seed=j) for j in range(8)] for i, n in enumerate(names[1:])}
    (work / "moe.yml").write_text(yaml.safe_dump({
        "base_model": str(models / "base"), "gate_mode": args.gate, "dtype": "bfloat16",
        "experts": [{"source_model": str(models / n), "positive_prompts": prompts[n]} for n in names[1:]],
    }))
    (work / "mode.yml").write_text(yaml.safe_dump({
        "base_model": str(models / "base"), "dtype": "bfloat16",
        "experts": [{"model": str(models / n)} | ({"prompts": prompts[n]} if args.gate == "hidden" else {})
                    for n in names[1:]],
        "router": {"mode": args.gate, "experts_per_token": 2}, "output": {"shard_size": "500MB"},
    }))
    for out in ("out-moe", "out-mode", "floor.bin"):
        shutil.rmtree(work / out, ignore_errors=True)
        (work / out).unlink(missing_ok=True)

    # What mergekit-mode reads: the base's stem and every expert's MLPs, i.e. at most all input bytes.
    inputs = [str(models / n / "model.safetensors") for n in names]
    out_bytes = _output_bytes(args.layers, args.experts)
    dropped = same_start(inputs)
    floor = timed([sys.executable, "-c", FLOOR, ",".join(inputs), str(work / "floor.bin"), str(out_bytes)], work)[:2]
    (work / "floor.bin").unlink()
    bindir = Path(sys.executable).parent
    same_start(inputs)
    moe = timed([str(bindir / "mergekit-moe"), "moe.yml", "out-moe", "--out-shard-size", "500M"], work, env)[:2]
    same_start(inputs)
    mode = timed([str(bindir / "mergekit-mode"), "mode.yml", "out-mode", "-q"], work, env)[:2]
    if not dropped:
        print("note: could not drop the page cache (not root): each run met the cache the previous one left, "
              "and writes slow down as earlier outputs fill it", file=sys.stderr)

    rows = [("I/O floor", floor), ("mergekit-moe 0.1.5", moe), ("mergekit-mode", mode)]
    print(f"\ngate {args.gate}, {args.experts} experts x {args.layers} layers, inputs {sum(os.path.getsize(f) for f in inputs) / 1e9:.2f} GB, "
          f"output {out_bytes / 1e9:.2f} GB, {os.cpu_count()} cores, {args.threads} thread(s)\n")
    print("| tool | wall s | peak RSS GB |\n|---|---|---|")
    for name, (wall, rss) in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} |")
    print(f"\nmergekit-mode / mergekit-moe: wall {mode[0] / moe[0]:.2f}x (target <= 0.6; hidden: <= 1.0), "
          f"RSS {mode[1] / moe[1]:.2f}x (target <= 0.25; hidden: <= 0.3)")
    print(f"mergekit-mode / I/O floor: wall {mode[0] / floor[0]:.2f}x (target <= 1.25)")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work)


def _output_bytes(layers: int, experts: int) -> int:
    per_layer = 4 * HIDDEN * HIDDEN + 2 * HIDDEN + experts * (3 * HIDDEN * INTERMEDIATE + HIDDEN)
    return 2 * (2 * VOCAB * HIDDEN + HIDDEN + layers * per_layer)


if __name__ == "__main__":
    main()
